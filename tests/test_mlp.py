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
from megatron_tsp.mlp import prefetch_gathered_fc1, tsp_expert_mlps, tsp_mlp
from megatron_tsp.zigzag import local_positions
from tests.multiprocess import run_on_ranks
from tests.numerics import (TOLERANCE, assert_gathered_close, assert_rel_close, gemm_flops,
                            run_on_cudas_gemm_path)

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
    keep_weights: bool = False  # --tsp-keep-weight-shards
    schedule: str = "ring"  # --tsp-mlp-schedule


def squared_relu(x: Tensor) -> Tensor:
    """Megatron's --squared-relu: an activation without an aten backward op in mlp.py's table (autograd's)."""
    return F.relu(x) ** 2


CASES = [
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16),  # SwiGLU
    Case(F.silu, gated=True, bias=False, batch=3, seq_len=24, dtype=torch.float64),
    Case(F.gelu, gated=True, bias=False, batch=3, seq_len=16),  # GeGLU
    Case(F.gelu, gated=True, bias=True, batch=1, seq_len=24, dtype=torch.float64),
    Case(F.gelu, gated=False, bias=True, batch=2, seq_len=24),  # plain GELU
    Case(F.gelu, gated=False, bias=False, batch=3, seq_len=16, dtype=torch.float64),
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16, dtype=torch.bfloat16),
    Case(F.silu, gated=True, bias=True, batch=3, seq_len=24, keep_weights=True),
    Case(F.gelu, gated=False, bias=False, batch=2, seq_len=16, dtype=torch.float64, keep_weights=True),
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16, dtype=torch.float64, schedule="gather"),
    Case(F.gelu, gated=False, bias=True, batch=3, seq_len=24, schedule="gather"),
    Case(F.silu, gated=True, bias=False, batch=3, seq_len=24, keep_weights=True, schedule="gather"),
    Case(F.silu, gated=True, bias=True, batch=2, seq_len=16, dtype=torch.bfloat16, schedule="gather"),
    Case(squared_relu, gated=True, bias=False, batch=2, seq_len=16, dtype=torch.float64),
    Case(squared_relu, gated=False, bias=True, batch=3, seq_len=24, schedule="gather"),
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


def _expected_bytes(case: Case, tsp_size: int) -> tuple[dict[str, Fraction], dict[str, Fraction]]:
    """Forward and backward bytes per rank by op (TSP.md: forward 3*F*h^2*(D-1)/D; backward: mlp.py
    docstring): the ring sends weights and accumulators; the gathered schedule all-gathers the weights (in
    backward without the fc1 bias) and reduce-scatters their grads."""
    share = Fraction(tsp_size - 1, tsp_size)
    ffn_multiple = Fraction(case.ffn, case.hidden)
    matrices = 3 if case.gated else 2
    bias = (matrices - 1) * case.ffn if case.bias else 0
    weights = matrices * ffn_multiple * case.hidden ** 2 + bias
    elem = torch.empty(0, dtype=case.dtype).element_size()
    refetched = 0 if case.keep_weights else 1  # kept weights do not travel again
    if case.schedule == "gather":
        return ({"all_gather": weights * elem * share},
                {"all_gather": refetched * (weights - bias) * elem * share,
                 "reduce_scatter": weights * max(elem, 4) * share})
    return ({"ring_send": weights * elem * share},
            {"ring_send": weights * (refetched * elem + max(elem, 4)) * share})


def _run_cases(rank: int, tsp_size: int, dtype: torch.dtype | None = None) -> None:
    group = dist.group.WORLD
    for case in CASES:
        if dtype is not None and case.dtype != dtype:
            continue
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
            with comm_bytes() as forward_bytes, gemm_flops() as forward_flops:
                out = tsp_mlp(x, fc1_weight, fc1_bias, fc2_weight, group, activation=case.activation,
                              gated=case.gated, keep_weights=case.keep_weights, schedule=case.schedule)
            with comm_bytes() as backward_bytes, gemm_flops() as backward_flops:
                out.backward(w["grad_out"][positions])
        # backward keeps forward's fc1 outputs: its GEMMs are exactly two forwards' (no fc1 recomputed)
        assert forward_flops["flops"] > 0 and backward_flops["flops"] == 2 * forward_flops["flops"], case

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
        for counted, expected in ((forward_bytes, expected_forward), (backward_bytes, expected_backward)):
            assert {op: n for op, n in counted.bytes_by_op.items() if n} == \
                   {op: n for op, n in expected.items() if n}, case
        # the ring: two weight slots (D when kept), the accumulator being sent and the one being received;
        # the gathered schedule holds whole gathered weights and grads instead of shard buffers
        ring = tsp_size > 1 and case.schedule == "ring"
        expected_peak = {"weight": tsp_size if case.keep_weights else 2, "grad": 2} if ring else {}
        assert dict(residency.peak) == expected_peak, case


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_mlp_matches_dense(tsp_size: int) -> None:
    run_on_ranks(_run_cases, tsp_size)


def _run_bf16_cases_as_on_cuda(rank: int, tsp_size: int) -> None:
    run_on_cudas_gemm_path(_run_cases, rank, tsp_size, ("aten.mm.dtype", "aten.addmm.dtype_out"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_mlp_matches_dense_with_cudas_fp32_gemms(tsp_size: int) -> None:
    """The bf16 cases (ring and gathered) on the path a GPU takes: the gathered schedule's weight grads out of
    their GEMMs in fp32, each ring step's output and input grad added into the fp32 sum by its GEMM."""
    run_on_ranks(_run_bf16_cases_as_on_cuda, tsp_size)


def _run_prefetched(rank: int, tsp_size: int) -> None:
    """The gathered MLP with fc1's gathers started ahead (as a TSP layer's attention starts them): the same
    output and grads, bitwise, and the same bytes; after an in-place change of fc1 (an optimizer step) the
    prefetched gathers are not used but made again, from the changed weight."""
    group, gen = dist.group.WORLD, torch.Generator().manual_seed(rank)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    x, grad_out = draw(8, 2, 16), draw(8, 2, 16)  # h = 16, gated ffn = 24: fc1 shard [48/D, 16]
    fc1_weight, fc1_bias, fc2_weight = draw(48 // tsp_size, 16), draw(48 // tsp_size), draw(16, 24 // tsp_size)

    def run(prefetch: bool) -> tuple[list[Tensor], dict]:
        leaves = [t.clone().requires_grad_() for t in (x, fc1_weight, fc1_bias, fc2_weight)]
        with comm_bytes() as counted:
            prefetched = prefetch_gathered_fc1(*leaves[1:3], group) if prefetch else None
            out = tsp_mlp(*leaves, group, schedule="gather", prefetched_fc1=prefetched)
            out.backward(grad_out)
        return [out.detach(), *(t.grad for t in leaves)], dict(counted.bytes_by_op)

    (plain, plain_bytes), (ahead, ahead_bytes) = run(prefetch=False), run(prefetch=True)
    assert all(torch.equal(a, b) for a, b in zip(ahead, plain, strict=True))
    assert ahead_bytes == plain_bytes
    other = prefetch_gathered_fc1(fc1_weight, fc1_bias, group)
    assert other.take(fc1_weight.clone(), fc1_bias) is None  # another tensor: not its gathers
    stale = prefetch_gathered_fc1(fc1_weight, fc1_bias, group)
    with torch.no_grad():
        fc1_weight.mul_(2)  # an optimizer step between the prefetch and the forward
    with comm_bytes() as stale_bytes:
        taken = stale.take(fc1_weight, fc1_bias)
        out = tsp_mlp(x, fc1_weight, fc1_bias, fc2_weight, group, schedule="gather", prefetched_fc1=stale)
    assert taken is None
    assert torch.equal(out, tsp_mlp(x, fc1_weight, fc1_bias, fc2_weight, group, schedule="gather"))
    if tsp_size > 1:  # the stale gathers were drained and the forward's own made again
        assert stale_bytes.bytes_by_op["all_gather"] > 0
    with pytest.raises(ValueError, match="gathered MLP"):
        tsp_mlp(x, fc1_weight, fc1_bias, fc2_weight, group, prefetched_fc1=stale)


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2])
def test_prefetched_fc1_is_the_same_and_never_stale(tsp_size: int) -> None:
    run_on_ranks(_run_prefetched, tsp_size)


# ------------------------------------------------------------------------------- experts (--tsp-expert-ring)

EXPERT_CASES = [  # (activation, gated, bias, dtype)
    (F.silu, True, True, torch.float32),
    (F.silu, True, False, torch.float64),
    (F.gelu, False, True, torch.float64),
]
NUM_EXPERTS = 3


def _expert_tokens(rank: int) -> list[int]:
    """Rank ``rank``'s dispatched tokens per local expert: unequal across ranks, with zeros."""
    return [(3 * rank + 2 * expert) % 5 for expert in range(NUM_EXPERTS)]


def _run_expert_cases(rank: int, tsp_size: int) -> None:
    group = dist.group.WORLD
    for activation, gated, bias, dtype in EXPERT_CASES:
        what = f"experts {activation.__name__} gated={gated} bias={bias} {dtype}"
        # Experts of different widths, so that a mix-up of experts cannot pass.
        cases = [Case(activation, gated, bias, 1, 1, dtype, ffn=32 + 16 * e) for e in range(NUM_EXPERTS)]
        experts = [_full_weights(case) for case in cases]
        gen = torch.Generator().manual_seed(99)
        tokens = {r: [torch.randn(n, cases[0].hidden, generator=gen, dtype=torch.float64).to(dtype)
                      for n in _expert_tokens(r)] for r in range(tsp_size)}
        grads_out = {r: [torch.randn_like(t) for t in ts] for r, ts in tokens.items()}

        # Reference: every rank's tokens through the full experts, in fp64; weight grads summed over ranks.
        references = []
        for e, (ref_case, w) in enumerate(zip(cases, experts)):
            w = dict(w, x=torch.cat([tokens[r][e] for r in range(tsp_size)]),
                     grad_out=torch.cat([grads_out[r][e] for r in range(tsp_size)]))
            references.append((ref_case, _dense_reference(ref_case, w)))

        x = torch.cat(tokens[rank]).requires_grad_()
        shards = []
        for (ref_case, _), w in zip(references, experts):
            shards.append((_megatron_fc1(w["gate"], w["up"], ref_case, tsp_size, rank).clone().requires_grad_(),
                           _megatron_fc1(w["gate_bias"], w["up_bias"], ref_case, tsp_size, rank).clone()
                           .requires_grad_() if bias else None,
                           _fc2_columns(w["down"], ref_case, tsp_size, rank).clone().requires_grad_()))
        with track_shard_residency() as residency, comm_bytes() as counted:
            out = tsp_expert_mlps(x, _expert_tokens(rank), shards, group, activation=activation, gated=gated)
            out.backward(torch.cat(grads_out[rank]))

        tol = TOLERANCE[dtype]
        rows = torch.cumsum(torch.tensor([0, *_expert_tokens(rank)]), 0).tolist()
        for e, ((ref_case, (ref_out, ref_grads)), (fc1_weight, fc1_bias, fc2_weight)) in enumerate(
                zip(references, shards)):
            before = sum(_expert_tokens(r)[e] for r in range(rank))  # this rank's rows in the reference
            mine = slice(before, before + _expert_tokens(rank)[e])
            if _expert_tokens(rank)[e]:
                assert_rel_close(out[rows[e]:rows[e + 1]].detach(), ref_out[mine], tol, f"{what} expert {e} out")
                assert_rel_close(x.grad[rows[e]:rows[e + 1]], ref_grads["x"][mine], tol, f"{what} expert {e} dx")
            assert_rel_close(fc1_weight.grad, _megatron_fc1(ref_grads["gate"], ref_grads.get("up"), ref_case,
                                                            tsp_size, rank), tol, f"{what} expert {e} fc1 grad")
            assert_rel_close(fc2_weight.grad, _fc2_columns(ref_grads["down"], ref_case, tsp_size, rank), tol,
                             f"{what} expert {e} fc2 grad")
            if bias:
                ref_bias = _megatron_fc1(ref_grads["gate_bias"], ref_grads.get("up_bias"), ref_case, tsp_size, rank)
                assert_rel_close(fc1_bias.grad, ref_bias, tol, f"{what} expert {e} fc1 bias grad")

        # One message carries every local expert's slices: the dense formulas with W summed over experts.
        elem = torch.empty(0, dtype=dtype).element_size()
        weights = sum(p.numel() for shard in shards for p in shard if p is not None)
        hops = tsp_size - 1  # of this rank's shard (W/D): forward and backward weights, backward accumulators
        assert counted.bytes_by_op.get("ring_send", 0) == weights * hops * (2 * elem + max(elem, 4)), what
        assert dict(residency.peak) == ({} if tsp_size == 1 else {"weight": 2, "grad": 2}), what


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_expert_ring_matches_dense_experts(tsp_size: int) -> None:
    run_on_ranks(_run_expert_cases, tsp_size)
