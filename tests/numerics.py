"""Comparison helpers shared by the exactness tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

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
def gemm_flops() -> Iterator[dict[str, int]]:
    """Count the FLOPs of the matrix products (aten mm, addmm, bmm: a linear layer on a strided input runs as
    bmm) run inside the block; on CPU the fused attention kernel is none of them. The dict's ``"flops"`` is
    set when the block ends."""
    from torch.utils.flop_counter import FlopCounterMode

    result = {"flops": 0}
    with FlopCounterMode(display=False) as counter:
        yield result
    counts = counter.get_flop_counts()["Global"]
    result["flops"] = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm))
