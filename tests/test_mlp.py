"""TSP MLP against a single-device dense reference, its byte counts against the formulas, residency."""

from __future__ import annotations

from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import comm_bytes, track_shard_residency
from megatron_tsp.mlp import tsp_mlp
from megatron_tsp.zigzag import local_positions
from tests.multiprocess import run_on_ranks
from tests.numerics import TOLERANCE, assert_gathered_close, assert_rel_close

@dataclass(frozen=True)
class Case:
    activation: Callable[[Tensor], Tensor]
    gated: bool
    bias: bool
    batch: int
    seq_len: int
    dtype: torch.dtype = torch.float32
    hidden: int = 32
    ffn: int = 64


CASES = [
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16),  # SwiGLU
    Case(F.silu, gated=True, bias=False, batch=3, seq_len=24, dtype=torch.float64),
    Case(F.gelu, gated=True, bias=False, batch=3, seq_len=16),  # GeGLU
    Case(F.gelu, gated=True, bias=True, batch=1, seq_len=24, dtype=torch.float64),
    Case(F.gelu, gated=False, bias=True, batch=2, seq_len=24),  # plain GELU
    Case(F.gelu, gated=False, bias=False, batch=3, seq_len=16, dtype=torch.float64),
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16, dtype=torch.bfloat16),
]


def _full_weights(case: Case) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(4321)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    h, ffn = case.hidden, case.ffn
    return dict(gate=rand(ffn, h, scale=h ** -0.5), up=rand(ffn, h, scale=h ** -0.5), gate_bias=rand(ffn),
                up_bias=rand(ffn), down=rand(h, ffn, scale=ffn ** -0.5), x=rand(case.seq_len, case.batch, h),
                grad_out=rand(case.seq_len, case.batch, h))


def _dense_reference(case: Case, w: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Output ``[S, B, h]`` and grads of x and of every full weight, in fp64."""
    p = {name: t.to(torch.float64, copy=True).requires_grad_() for name, t in w.items() if name != "grad_out"}
    gate = F.linear(p["x"], p["gate"], p["gate_bias"] if case.bias else None)
    if case.gated:
        hidden = case.activation(gate) * F.linear(p["x"], p["up"], p["up_bias"] if case.bias else None)
    else:
        hidden = case.activation(gate)
    out = F.linear(hidden, p["down"])
    out.backward(w["grad_out"].double())
    return out.detach(), {name: t.grad for name, t in p.items() if t.grad is not None}


def _megatron_fc1(gate: Tensor, up: Tensor, case: Case, tsp_size: int, rank: int) -> Tensor:
    """TP shard ``rank`` of fc1 rows (weight or bias): [gate slice ; up slice] when gated, else the slice."""
    width = case.ffn // tsp_size
    rows = slice(rank * width, (rank + 1) * width)
    return torch.cat([gate[rows], up[rows]]) if case.gated else gate[rows]


def _fc2_columns(down: Tensor, case: Case, tsp_size: int, rank: int) -> Tensor:
    width = case.ffn // tsp_size
    return down[:, rank * width:(rank + 1) * width]


def _expected_bytes(case: Case, tsp_size: int) -> tuple[Fraction, Fraction]:
    """Forward and backward ring bytes per rank (TSP.md: forward 3*F*h^2*(D-1)/D; backward: mlp.py docstring)."""
    share = Fraction(tsp_size - 1, tsp_size)
    ffn_multiple = Fraction(case.ffn, case.hidden)
    matrices = 3 if case.gated else 2
    weights = matrices * ffn_multiple * case.hidden ** 2 + ((matrices - 1) * case.ffn if case.bias else 0)
    elem = torch.empty(0, dtype=case.dtype).element_size()
    return weights * elem * share, weights * (elem + max(elem, 4)) * share


def _run_cases(rank: int, tsp_size: int) -> None:
    group = dist.group.WORLD
    for case in CASES:
        w = _full_weights(case)
        ref_out, ref_grads = _dense_reference(case, w)
        positions = local_positions(case.seq_len, tsp_size, rank)
        x = w["x"][positions].clone().requires_grad_()
        fc1_weight = _megatron_fc1(w["gate"], w["up"], case, tsp_size, rank).clone().requires_grad_()
        fc1_bias = (_megatron_fc1(w["gate_bias"], w["up_bias"], case, tsp_size, rank).clone().requires_grad_()
                    if case.bias else None)
        fc2_weight = _fc2_columns(w["down"], case, tsp_size, rank).clone().requires_grad_()
        params = [p for p in (fc1_weight, fc1_bias, fc2_weight) if p is not None]
        grad_ready = Counter()  # Megatron DDP's grad-ready hooks must fire once per param
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p, counts=grad_ready: counts.update([id(p)]))

        with track_shard_residency() as residency:
            with comm_bytes() as forward_bytes:
                out = tsp_mlp(x, fc1_weight, fc1_bias, fc2_weight, group, activation=case.activation,
                              gated=case.gated)
            with comm_bytes() as backward_bytes:
                out.backward(w["grad_out"][positions])

        tol = TOLERANCE[case.dtype]
        assert_gathered_close(out.detach(), ref_out, group, tol, f"{case} output")
        assert_gathered_close(x.grad, ref_grads["x"], group, tol, f"{case} x grad")
        assert_rel_close(fc1_weight.grad, _megatron_fc1(ref_grads["gate"], ref_grads.get("up"), case, tsp_size, rank),
                         tol, f"{case} fc1 weight grad")
        assert_rel_close(fc2_weight.grad, _fc2_columns(ref_grads["down"], case, tsp_size, rank), tol,
                         f"{case} fc2 weight grad")
        if case.bias:
            ref_bias = _megatron_fc1(ref_grads["gate_bias"], ref_grads.get("up_bias"), case, tsp_size, rank)
            assert_rel_close(fc1_bias.grad, ref_bias, tol, f"{case} fc1 bias grad")
        assert all(p.grad.dtype == p.dtype for p in params)
        assert grad_ready == Counter(id(p) for p in params), f"{case}: grad-ready hooks fired {grad_ready}"

        expected_forward, expected_backward = _expected_bytes(case, tsp_size)
        assert forward_bytes.total() == expected_forward and backward_bytes.total() == expected_backward, case
        assert {op for op, n in (forward_bytes.bytes_by_op | backward_bytes.bytes_by_op).items() if n} <= \
               {"ring_send"}
        # two weight slots; the accumulator being sent and the one being received
        expected_peak = {} if tsp_size == 1 else {"weight": 2, "grad": 2}
        assert dict(residency.peak) == expected_peak, case


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_mlp_matches_dense(tsp_size: int) -> None:
    run_on_ranks(_run_cases, tsp_size)
