"""The zigzag core-attention backend against the dense-mask reference: values, grads, memory, layout checks."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from megatron_tsp.kernels import (
    FUSED_CPU,
    PartKernel,
    causal_attention,
    math_part_kernel,
    select_core_attention,
    zigzag_causal_attention,
)
from megatron_tsp.zigzag import gathered_positions, local_positions
from tests.numerics import TOLERANCE, assert_rel_close

KERNELS = ["fused_cpu", "math"]


def _part_kernel(name: str, seq_len: int, tsp_size: int, heads: int) -> PartKernel:
    """The named part kernel; the math one with a tile of half a diagonal part (for :func:`_inputs`' batch
    of 2), so that every part spans several row blocks."""
    chunk = seq_len // (2 * tsp_size)
    return FUSED_CPU if name == "fused_cpu" else math_part_kernel(block_elements=heads * chunk * chunk)


def _inputs(seq_len: int, tsp_size: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int,
            batch: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q ``[S/D, b, nq, 16]``, k/v ``[S, b, nkv, 16]`` (leaves) and an output grad ``[S/D, b, nq*16]``."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 16

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    local_len = seq_len // tsp_size
    q = rand(local_len, batch, heads, head_dim).requires_grad_()
    k = rand(seq_len, batch, kv_heads, head_dim).requires_grad_()
    v = rand(seq_len, batch, kv_heads, head_dim).requires_grad_()
    return q, k, v, rand(local_len, batch, heads * head_dim)


def _output_and_grads(kernel: PartKernel | None, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor,
                      q_positions: Tensor, k_positions: Tensor) -> list[Tensor]:
    """[output, dq, dk, dv] of the zigzag backend (``kernel``) or, for None, of the dense reference."""
    if kernel is None:
        out = causal_attention(q, k, v, q_positions, k_positions, 0.3)
    else:
        out = zigzag_causal_attention(q, k, v, q_positions, k_positions, 0.3, part_kernel=kernel)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seq_len", [24, 1088])  # 1088 at D = 1: chunks of 544 keys, past the CPU kernel's tile
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_dense_reference(kernel: str, seq_len: int, heads: int, kv_heads: int, tsp_size: int,
                                 dtype: torch.dtype) -> None:
    k_positions = gathered_positions(seq_len, tsp_size)
    for rank in range(tsp_size):
        q_positions = local_positions(seq_len, tsp_size, rank)
        q, k, v, grad_out = _inputs(seq_len, tsp_size, heads, kv_heads, dtype, seed=rank)
        expected = _output_and_grads(None, q, k, v, grad_out, q_positions, k_positions)
        part_kernel = _part_kernel(kernel, seq_len, tsp_size, heads)
        actual = _output_and_grads(part_kernel, q, k, v, grad_out, q_positions, k_positions)
        for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected, strict=True):
            assert_rel_close(got, want, TOLERANCE[dtype], f"rank {rank} {name}")


def test_default_backend() -> None:
    assert select_core_attention(config=None, layer_number=1) is zigzag_causal_attention


def _peak_bytes(fn: Callable[[], None]) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs (kernel-internal scratch included), above the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    current = peak = 0
    for event in allocations:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def test_never_a_dense_mask() -> None:
    """Forward + backward peak of either part kernel stays below half of one [S/D, S] boolean mask, which the
    reference does allocate. K/V (256 KB each) are tiny next to S^2/D here, so a mask-sized tensor would show.
    """
    seq_len, tsp_size, rank = 8192, 2, 1
    q, k, v, grad_out = _inputs(seq_len, tsp_size, 2, 1, torch.float32, seed=0, batch=1)
    q_positions, k_positions = local_positions(seq_len, tsp_size, rank), gathered_positions(seq_len, tsp_size)
    mask_bytes = seq_len // tsp_size * seq_len

    def run(part_kernel: PartKernel | None) -> None:
        _output_and_grads(part_kernel, q, k, v, grad_out, q_positions, k_positions)

    assert _peak_bytes(partial(run, None)) >= mask_bytes  # the measurement sees the reference's mask
    for part_kernel in (FUSED_CPU, math_part_kernel(block_elements=1 << 18)):
        assert _peak_bytes(partial(run, part_kernel)) < mask_bytes // 2


def test_rejects_other_layouts() -> None:
    seq_len, tsp_size = 16, 2
    q, k, v, _ = _inputs(seq_len, tsp_size, 4, 2, torch.float64, seed=0)
    q_positions, k_positions = local_positions(seq_len, tsp_size, 1), gathered_positions(seq_len, tsp_size)
    for bad_q, bad_k in ((q_positions.flip(0), k_positions), (q_positions, torch.arange(seq_len)),
                         (q_positions[:-1], k_positions)):
        with pytest.raises(ValueError, match="zigzag"):
            zigzag_causal_attention(q, k, v, bad_q, bad_k, 0.3)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        zigzag_causal_attention(q[:, :, :3], k, v, q_positions, k_positions, 0.3)
