"""Where one call's time goes on a GPU: wall time, time the device was busy, and the kernels that filled it;
and, on any device, how many operators that do work a call dispatches and how many bytes its memory-bound
ones move.

Used by the benchmarks' ``--profile`` flags (torch profiler, CPU and CUDA activity). A device busy for much
less than the wall time is waiting for the host (launch overhead, syncs); otherwise the kernel table says
which kernels to speed up. The operator count and the memory-bound bytes (:func:`tally_work`) are what a CPU
can measure too: each such operator is at least one kernel launch on a GPU (the host's cost where a step is
launch-bound), and the bytes the non-GEMM operators read and write set their time where the GPU is busy.
:func:`cuda_fp32_gemms_on_cpu` has a CPU run dispatch the GEMMs with fp32 results of 16-bit inputs that a
CUDA device runs (and CPU torch lacks), so that its tally is the GPU's.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_tsp import grads

# aten operators that allocate or alias without touching data (no kernel on a GPU); ``_unsafe_view`` is the
# reshape of a fresh result (e.g. a matmul's) that autograd does not track as a view
_NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "set_", "resize_", "promote_types", "result_type", "_unsafe_view"}
# compute-bound operators (GEMMs and fused attention kernels, by name prefix), left out of the memory-bound bytes
_COMPUTE_BOUND = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_dot_product", "_flash_attention",
                  "_efficient_attention", "_cudnn_attention")


@dataclass
class WorkTally:
    """What a call dispatched: ``operators`` that read or write tensor data (views and bare allocations left
    out, each collective one), and ``memory_bound_bytes``, the bytes of the inputs and outputs of those that
    are neither GEMMs, fused attention kernels nor collectives (a broadcast input counts at its broadcast
    size), by operator name in ``bytes_by_op``."""

    operators: int = 0
    memory_bound_bytes: int = 0
    bytes_by_op: Counter[str] = field(default_factory=Counter)


class _TallyWork(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.tally = WorkTally()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.is_view or name in _NO_WORK:
            return out
        self.tally.operators += 1
        if func.namespace in ("c10d", "_c10d_functional") or name.startswith(_COMPUTE_BOUND):
            return out
        # an out= argument is written, not read: counted once, as the result it is
        written = {a.name for a in func._schema.arguments if a.kwarg_only and a.alias_info and a.alias_info.is_write}
        read = (args, {key: value for key, value in (kwargs or {}).items() if key not in written})
        moved = sum(t.numel() * t.element_size() for t in tree_leaves((read, out)) if isinstance(t, torch.Tensor))
        self.tally.memory_bound_bytes += moved
        self.tally.bytes_by_op[name] += moved
        return out


def tally_work(fn: Callable[[], object]) -> WorkTally:
    """Run ``fn()`` and return its :class:`WorkTally`."""
    with _TallyWork() as tally:
        fn()
    return tally.tally


def print_device_profile(label: str, fn: Callable[[], object], rows: int = 12) -> None:
    """Run ``fn()`` once under the profiler and print its wall time, device-busy time, kernel launches and
    the ``rows`` kernels with the most device time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    launches = sum(e.count for e in kernels)
    print(f"profile {label}: wall {wall * 1e3:.1f} ms (under the profiler), device busy {busy * 1e3:.1f} ms "
          f"({busy / wall:.0%}), {launches} kernels")
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"  {event.self_device_time_total / 1e3:9.2f} ms {event.count:6d}x  {event.key[:110]}")


@contextlib.contextmanager
def cuda_fp32_gemms_on_cpu() -> Iterator[None]:
    """Within: CPU kernels for aten's ``mm`` and ``addmm`` with ``out_dtype`` (CUDA-only in torch), computed in
    the out dtype, so that the TSP schedules take the path they take on a GPU, where a weight grad or a
    partial sum of 16-bit inputs comes out of its GEMM in fp32 (``megatron_tsp.grads``); a tally then counts
    the operators and memory-bound bytes a GPU step dispatches. Numerically an emulation, for counting only."""
    def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return a.to(out_dtype) @ b.to(out_dtype)

    def mm_out(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, *, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(a.to(out_dtype), b.to(out_dtype), out=out)

    def addmm_out(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, *, beta: float = 1,
                  alpha: float = 1, out: torch.Tensor) -> torch.Tensor:
        return torch.addmm(total, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)

    library = torch.library.Library("aten", "IMPL")
    for overload, kernel in (("mm.dtype", mm), ("mm.dtype_out", mm_out), ("addmm.dtype_out", addmm_out)):
        library.impl(overload, kernel, "CPU")
    # grads asks each device once, and a CPU never: answered for the CPU here, and forgotten after
    grads._FUSED_WORKS.update({(torch.device("cpu"), dtype, into_sum): True
                               for dtype in grads._FUSED_DTYPES for into_sum in (False, True)})
    try:
        yield
    finally:
        library._destroy()  # the registrations go with the library object; destroyed now, not at its GC
        grads._FUSED_WORKS.clear()
