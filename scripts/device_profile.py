"""Where one call's time goes on a GPU: wall time, time the device was busy, and the kernels that filled it;
and, on any device, how many operators that do work a call dispatches.

Used by the benchmarks' ``--profile`` flags (torch profiler, CPU and CUDA activity). A device busy for much
less than the wall time is waiting for the host (launch overhead, syncs); otherwise the kernel table says
which kernels to speed up. The operator count (:func:`count_work_ops`) is the host-side measure that a CPU
can take too: each such operator is at least one kernel launch on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that allocate or alias without touching data (no kernel on a GPU); ``_unsafe_view`` is the
# reshape of a fresh result (e.g. a matmul's) that autograd does not track as a view
_NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "set_", "resize_", "promote_types", "result_type", "_unsafe_view"}


class _CountWorkOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if not func.is_view and func.__name__.split(".")[0] not in _NO_WORK:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_work_ops(fn: Callable[[], object]) -> int:
    """aten operators ``fn()`` dispatches that read or write tensor data (views and bare allocations left out;
    collectives included, as one each)."""
    with _CountWorkOps() as counter:
        fn()
    return counter.count


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
