"""Comparison helpers shared by the exactness tests."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_tsp.zigzag import inverse_zigzag_permutation

# Relative tolerance against a single-device reference, by dtype (fp32/fp64 are the project's bar).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected|, and equal shapes."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert actual.shape == expected.shape and error <= tol * scale, f"{what}: error {error:.3g} vs scale {scale:.3g}"


def assert_gathered_close(local: Tensor, expected: Tensor, group, tol: float, what: str) -> None:
    """All-gather this rank's zigzag sequence shard ``[S/D, ...]``, undo the zigzag order and compare the full
    ``[S, ...]`` tensor with ``expected`` (in natural order)."""
    seq_len = expected.shape[0]
    gathered = torch.empty((seq_len, *local.shape[1:]), dtype=local.dtype)
    dist.all_gather_into_tensor(gathered, local.contiguous(), group)
    assert_rel_close(gathered[inverse_zigzag_permutation(seq_len, dist.get_world_size(group))], expected, tol, what)


@contextmanager
def cuda_fp32_gemms_on_cpu() -> Iterator[None]:
    """Within: scripts/device_profile.py's CPU kernels for the 16-bit GEMMs with fp32 results that CUDA runs,
    so that the schedules take their GPU path (``megatron_tsp.grads``) on CPU."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from device_profile import cuda_fp32_gemms_on_cpu as emulated

    with emulated():
        yield


def run_on_cudas_gemm_path(run_cases: Callable[[int, int, torch.dtype], None], rank: int, tsp_size: int,
                           taken: Sequence[str]) -> None:
    """Run ``run_cases(rank, tsp_size, torch.bfloat16)`` (a test's 16-bit cases) with CUDA's fp32-result GEMMs
    emulated (:func:`cuda_fp32_gemms_on_cpu`), and assert that the schedules took that path: each aten
    overload in ``taken`` was dispatched."""
    with cuda_fp32_gemms_on_cpu(), dispatched_overloads() as dispatched:
        run_cases(rank, tsp_size, torch.bfloat16)
    assert all(dispatched[overload] for overload in taken), (taken, dispatched)


class _Dispatched(TorchDispatchMode):
    """Counts the aten operator overloads dispatched and the FLOPs of the matrix products (mm, addmm, bmm: a
    linear layer on a strided input runs as bmm; any overload, ``out_dtype`` ones included, which torch's
    FlopCounterMode rejects with ``out=``) among them."""

    def __init__(self) -> None:
        super().__init__()
        self.overloads: Counter[str] = Counter()
        self.gemm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        self.overloads[str(func)] += 1
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and name in ("mm", "bmm", "addmm"):
            a, b = args[1:3] if name == "addmm" else args[:2]  # [(batch,) m, k] @ [(batch,) k, n]
            self.gemm_flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


@contextmanager
def dispatched_overloads() -> Iterator[Counter[str]]:
    """Count the aten operator overloads (``"aten.mm.dtype"``) dispatched inside the block."""
    with _Dispatched() as mode:
        yield mode.overloads


@contextmanager
def gemm_flops() -> Iterator[dict[str, int]]:
    """Count the FLOPs of the matrix products run inside the block (on CPU the fused attention kernel is none
    of them). The dict's ``"flops"`` is set when the block ends."""
    result = {"flops": 0}
    with _Dispatched() as mode:
        yield result
    result["flops"] = mode.gemm_flops
