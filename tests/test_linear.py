"""The gathered column-parallel linear (multi-token prediction's eh_proj) against a single-device linear."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tsp.comm import comm_bytes
from megatron_tsp.linear import tsp_gathered_linear
from tests.multiprocess import run_on_ranks
from tests.numerics import TOLERANCE, assert_rel_close


def _run(rank: int, tsp_size: int) -> None:
    group = dist.group.WORLD
    for dtype in (torch.float32, torch.float64):
        seq_len, batch, k, n = 16, 2, 24, 8
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(seq_len, batch, k, generator=gen, dtype=torch.float64)
        weight = torch.randn(n, k, generator=gen, dtype=torch.float64) * k ** -0.5
        grad_out = torch.randn(seq_len, batch, n, generator=gen, dtype=torch.float64)
        ref_x, ref_weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        F.linear(ref_x, ref_weight).backward(grad_out)

        rows, weight_rows = seq_len // tsp_size, n // tsp_size
        local_x = x[rank * rows:(rank + 1) * rows].to(dtype).requires_grad_()
        shard = weight[rank * weight_rows:(rank + 1) * weight_rows].to(dtype).requires_grad_()
        with comm_bytes() as forward_bytes:
            out = tsp_gathered_linear(local_x, shard, group)
        with comm_bytes() as backward_bytes:
            out.backward(grad_out[rank * rows:(rank + 1) * rows].to(dtype))

        tol, what = TOLERANCE[dtype], f"D={tsp_size} {dtype}"
        local = slice(rank * rows, (rank + 1) * rows)
        assert out.shape == (rows, batch, n) and out.dtype == dtype
        assert_rel_close(out.detach(), F.linear(x, weight)[local], tol, f"{what} out")
        assert_rel_close(local_x.grad, ref_x.grad[local], tol, f"{what} dx")
        assert_rel_close(shard.grad, ref_weight.grad[rank * weight_rows:(rank + 1) * weight_rows], tol,
                         f"{what} dweight")
        weight_bytes = n * k * local_x.element_size() * Fraction(tsp_size - 1, tsp_size)
        assert forward_bytes.bytes_by_op == {"all_gather": weight_bytes}, what
        assert backward_bytes.bytes_by_op == {"all_gather": weight_bytes, "reduce_scatter": weight_bytes}, what


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_gathered_linear_matches_a_single_device_linear(tsp_size: int) -> None:
    """Output, input grad and weight-shard grad at D = 1, 2, 4 in fp32 and fp64, and the weight's bytes:
    gathered in forward and again in backward, its grad reduce-scattered; no activation moves."""
    run_on_ranks(_run, tsp_size)
