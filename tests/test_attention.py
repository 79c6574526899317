"""TSP attention against a single-device dense reference, its byte counts against the formulas, residency.

Every rank builds the same full weights (same seed), takes its Megatron-layout shard and its zigzag slice of
the sample, runs TSP forward and backward, and compares output, input grad and every weight grad with plain
dense attention on the full weights over the sequence in natural order with a standard causal mask.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from torch import Tensor

from megatron_tsp.attention import (
    QKNorm,
    apply_rotary,
    apply_rotary_cos_sin,
    head_layer_norm,
    head_rms_norm,
    per_head_rotary,
    rotary_cos_sin,
    tsp_attention,
)
from megatron_tsp.comm import comm_bytes, track_shard_residency
from megatron_tsp.kernels import ZIGZAG, AttentionBackend, causal_attention
from megatron_tsp.zigzag import (
    gathered_positions,
    local_positions,
)
from tests.multiprocess import run_on_ranks
from tests.numerics import (TOLERANCE, assert_gathered_close, assert_rel_close, gemm_flops,
                            run_on_cudas_gemm_path)

@dataclass(frozen=True)
class Case:
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    seq_len: int
    dtype: torch.dtype = torch.float32
    rotary_percent: float | None = None  # None: no RoPE
    qkv_bias: bool = False
    qk_norm: str | None = None  # "layer" (with bias) or "rms"
    keep_weights: bool = False  # --tsp-keep-weight-shards
    buckets_per_call: int = 1  # --tsp-attention-buckets-per-call

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def _cases(tsp_size: int) -> list[Case]:
    d = tsp_size
    return [
        Case(heads=4, kv_heads=4, head_dim=8, batch=2, seq_len=16),  # MHA
        Case(heads=2 * max(d, 2), kv_heads=d, head_dim=32 // (2 * max(d, 2)), batch=3, seq_len=24,
             rotary_percent=1.0, qkv_bias=True),  # GQA, nkv = D
        Case(heads=4 * d, kv_heads=2 * d, head_dim=4, batch=1, seq_len=16, rotary_percent=0.5,
             qk_norm="layer"),  # GQA, nkv = 2D
        Case(heads=4, kv_heads=4, head_dim=8, batch=3, seq_len=24, dtype=torch.float64, rotary_percent=1.0,
             qkv_bias=True, qk_norm="rms"),
        Case(heads=2 * d, kv_heads=d, head_dim=8, batch=2, seq_len=16, dtype=torch.float64, rotary_percent=0.5),
        Case(heads=4, kv_heads=4, head_dim=8, batch=2, seq_len=16, dtype=torch.bfloat16, qkv_bias=True),
        Case(heads=2 * d, kv_heads=d, head_dim=8, batch=3, seq_len=24, rotary_percent=1.0, qkv_bias=True,
             keep_weights=True),
        Case(heads=4, kv_heads=4, head_dim=8, batch=1, seq_len=16, dtype=torch.float64, rotary_percent=0.5,
             qk_norm="layer", keep_weights=True),
        Case(heads=2 * d, kv_heads=d, head_dim=8, batch=2, seq_len=16, dtype=torch.float64, rotary_percent=1.0,
             qkv_bias=True, qk_norm="layer", buckets_per_call=d),  # one call over every bucket
        Case(heads=4 * d, kv_heads=2 * d, head_dim=4, batch=3, seq_len=24, rotary_percent=0.5, qkv_bias=True,
             keep_weights=True, buckets_per_call=max(d // 2, 1)),  # D/G = 2 calls (D > 1), weights kept
        Case(heads=2 * d, kv_heads=d, head_dim=8, batch=2, seq_len=16, dtype=torch.bfloat16, rotary_percent=1.0,
             keep_weights=True, buckets_per_call=d),  # one call, 16-bit, weights kept
    ]


def _rope_angles(seq_len: int, rot_dim: int, dtype: torch.dtype) -> Tensor:
    """Megatron's RotaryEmbedding output ``[S, 1, 1, rot_dim]`` (base 10000), built here independently."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.cat((freqs, freqs), dim=-1).view(seq_len, 1, 1, rot_dim).to(dtype)


def _full_weights(case: Case) -> dict[str, Tensor]:
    """Dense weights in natural layout: q/k/v/o projections, their biases and the q/k-norm params."""
    gen = torch.Generator().manual_seed(1234)
    h, hd = case.hidden, case.head_dim

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    return dict(q=rand(case.heads * hd, h, scale=h ** -0.5), k=rand(case.kv_heads * hd, h, scale=h ** -0.5),
                v=rand(case.kv_heads * hd, h, scale=h ** -0.5), o=rand(h, case.heads * hd, scale=h ** -0.5),
                bq=rand(case.heads * hd), bk=rand(case.kv_heads * hd), bv=rand(case.kv_heads * hd),
                q_norm_w=1 + rand(hd, scale=0.1), q_norm_b=rand(hd, scale=0.1),
                k_norm_w=1 + rand(hd, scale=0.1), k_norm_b=rand(hd, scale=0.1),
                x=rand(case.seq_len, case.batch, h), grad_out=rand(case.seq_len, case.batch, h))


def _megatron_qkv_rows(q: Tensor, k: Tensor, v: Tensor, case: Case, tsp_size: int, rank: int) -> Tensor:
    """TP shard ``rank`` of a fused qkv tensor (weight rows or bias): per local kv group, its q heads, k, v."""
    group = case.heads // case.kv_heads
    hd = case.head_dim
    kv_per_rank = case.kv_heads // tsp_size
    rows = []
    for kv_head in range(rank * kv_per_rank, (rank + 1) * kv_per_rank):
        rows += [q[kv_head * group * hd:(kv_head + 1) * group * hd], k[kv_head * hd:(kv_head + 1) * hd],
                 v[kv_head * hd:(kv_head + 1) * hd]]
    return torch.cat(rows)


def _proj_columns(o: Tensor, case: Case, tsp_size: int, rank: int) -> Tensor:
    width = case.heads // tsp_size * case.head_dim
    return o[:, rank * width:(rank + 1) * width]


def _dense_reference(case: Case, w: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Output ``[S, B, h]`` and grads of x and every full weight, natural order, standard causal mask (fp64)."""
    params = {name: w[name].to(torch.float64, copy=True).requires_grad_() for name in
              ("x", "q", "k", "v", "o", "bq", "bk", "bv", "q_norm_w", "q_norm_b", "k_norm_w", "k_norm_b")}
    x, seq_len, batch, hd = params["x"], case.seq_len, case.batch, case.head_dim
    bias = case.qkv_bias
    q = F.linear(x, params["q"], params["bq"] if bias else None).view(seq_len, batch, case.heads, hd)
    k = F.linear(x, params["k"], params["bk"] if bias else None).view(seq_len, batch, case.kv_heads, hd)
    v = F.linear(x, params["v"], params["bv"] if bias else None).view(seq_len, batch, case.kv_heads, hd)
    if case.qk_norm == "layer":
        q = F.layer_norm(q, (hd,), params["q_norm_w"], params["q_norm_b"], 1e-5)
        k = F.layer_norm(k, (hd,), params["k_norm_w"], params["k_norm_b"], 1e-5)
    elif case.qk_norm == "rms":
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5) * params["q_norm_w"]
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5) * params["k_norm_w"]
    if case.rotary_percent is not None:
        angles = _rope_angles(seq_len, int(hd * case.rotary_percent), torch.float64)
        q, k = _apply_rotary_pos_emb_bshd(q, angles), _apply_rotary_pos_emb_bshd(k, angles)
    group = case.heads // case.kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * hd ** -0.5
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    attn = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(seq_len, batch, case.hidden)
    out = F.linear(attn, params["o"])
    out.backward(w["grad_out"].double())
    return out.detach(), {name: p.grad for name, p in params.items() if p.grad is not None}


def _expected_bytes(case: Case, tsp_size: int) -> tuple[dict[str, Fraction], dict[str, Fraction]]:
    """Forward and backward bytes per rank from the TSP.md formulas (backward terms: attention.py docstring);
    with one call over all D buckets the weights' broadcasts are one all-gather and their grads' reduces one
    reduce-scatter."""
    share = Fraction(tsp_size - 1, tsp_size)
    h, g = case.hidden, Fraction(case.heads, case.kv_heads)
    elem = torch.empty(0, dtype=case.dtype).element_size()
    acc = max(elem, 4)
    weights = (2 + 2 / g) * h * h + ((1 + 2 / g) * h if case.qkv_bias else 0)
    kv = 2 * case.batch * case.seq_len * h / g
    fetch, kv_bytes, grads = weights * elem * share, kv * elem * share, weights * acc * share
    refetch = 0 if case.keep_weights else fetch
    if case.buckets_per_call == tsp_size > 1:
        return ({"all_gather": fetch + kv_bytes},
                {"all_gather": refetch + kv_bytes, "reduce_scatter": kv_bytes + grads})
    return ({"broadcast": fetch, "all_gather": kv_bytes},
            {"broadcast": refetch, "all_gather": kv_bytes, "reduce_scatter": kv_bytes, "reduce": grads})


def _counting(backend: AttentionBackend, calls: Counter) -> AttentionBackend:
    """``backend`` with its forward and backward calls counted in ``calls``."""
    def forward(*args: object) -> tuple[Tensor, ...]:
        calls["forward"] += 1
        return backend.forward(*args)

    def backward(*args: object) -> tuple[Tensor, Tensor, Tensor]:
        calls["backward"] += 1
        return backend.backward(*args)
    return AttentionBackend(forward, backward)


def _run_cases(rank: int, tsp_size: int, dtype: torch.dtype | None = None) -> None:
    group = dist.group.WORLD
    for case in _cases(tsp_size):
        if dtype is not None and case.dtype != dtype:
            continue
        w = _full_weights(case)
        ref_out, ref_grads = _dense_reference(case, w)
        positions = local_positions(case.seq_len, tsp_size, rank)

        def shard(tensor: Tensor) -> Tensor:
            return tensor.clone().requires_grad_()

        x = shard(w["x"][positions])
        qkv_weight = shard(_megatron_qkv_rows(w["q"], w["k"], w["v"], case, tsp_size, rank))
        qkv_bias = shard(_megatron_qkv_rows(w["bq"], w["bk"], w["bv"], case, tsp_size, rank)) if case.qkv_bias else None
        proj_weight = shard(_proj_columns(w["o"], case, tsp_size, rank))
        qk_norm = None
        if case.qk_norm is not None:
            layer = case.qk_norm == "layer"
            qk_norm = QKNorm(fn=head_layer_norm if layer else head_rms_norm, q_weight=shard(w["q_norm_w"]),
                             k_weight=shard(w["k_norm_w"]), q_bias=shard(w["q_norm_b"]) if layer else None,
                             k_bias=shard(w["k_norm_b"]) if layer else None)
        rotary = None
        if case.rotary_percent is not None:
            angle_dtype = torch.promote_types(case.dtype, torch.float32)  # angles stay fp32, as in Megatron
            rotary = _rope_angles(case.seq_len, int(case.head_dim * case.rotary_percent), angle_dtype)[positions]
        params = [p for p in (qkv_weight, qkv_bias, proj_weight) if p is not None]
        if qk_norm is not None:
            params += [p for p in (qk_norm.q_weight, qk_norm.q_bias, qk_norm.k_weight, qk_norm.k_bias) if p is not None]
        grad_ready = Counter()  # Megatron DDP's grad-ready hooks must fire once per param
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p, counts=grad_ready: counts.update([id(p)]))

        kernel_calls = Counter()
        with track_shard_residency() as residency:
            with comm_bytes() as forward_bytes, gemm_flops() as forward_flops:
                out = tsp_attention(x, qkv_weight, qkv_bias, proj_weight, positions,
                                    gathered_positions(case.seq_len, tsp_size), group, case.heads, case.kv_heads,
                                    rotary_freqs=rotary, qk_norm=qk_norm, keep_weights=case.keep_weights,
                                    core_attention=_counting(ZIGZAG, kernel_calls),
                                    buckets_per_call=case.buckets_per_call)
            with comm_bytes() as backward_bytes, gemm_flops() as backward_flops:
                out.backward(w["grad_out"][positions])
        # one attention forward per call (of G buckets), kept for backward: backward never recomputes it; nor
        # the qkv projection, so the projections' GEMMs in backward are exactly two forwards'
        calls = tsp_size // case.buckets_per_call
        assert kernel_calls == {"forward": calls, "backward": calls}, kernel_calls
        assert forward_flops["flops"] > 0 and backward_flops["flops"] == 2 * forward_flops["flops"], case

        tol = TOLERANCE[case.dtype]
        assert_gathered_close(out.detach(), ref_out, group, tol, f"{case} output")
        assert_gathered_close(x.grad, ref_grads["x"], group, tol, f"{case} x grad")
        ref_qkv = _megatron_qkv_rows(ref_grads["q"], ref_grads["k"], ref_grads["v"], case, tsp_size, rank)
        assert_rel_close(qkv_weight.grad, ref_qkv, tol, f"{case} qkv weight grad")
        assert_rel_close(proj_weight.grad, _proj_columns(ref_grads["o"], case, tsp_size, rank), tol,
                         f"{case} proj weight grad")
        if case.qkv_bias:
            ref_bias = _megatron_qkv_rows(ref_grads["bq"], ref_grads["bk"], ref_grads["bv"], case, tsp_size, rank)
            assert_rel_close(qkv_bias.grad, ref_bias, tol, f"{case} qkv bias grad")
        if qk_norm is not None:  # partial per rank: summed over the group like any replicated token-local param
            for name, ref_name in (("q_weight", "q_norm_w"), ("q_bias", "q_norm_b"), ("k_weight", "k_norm_w"),
                                   ("k_bias", "k_norm_b")):
                param = getattr(qk_norm, name)
                if param is not None:
                    dist.all_reduce(param.grad, group=group)
                    assert_rel_close(param.grad, ref_grads[ref_name], tol, f"{case} {name} grad")
        assert all(p.grad.dtype == p.dtype for p in params)
        assert grad_ready == Counter(id(p) for p in params), f"{case}: grad-ready hooks fired {grad_ready}"

        expected_forward, expected_backward = _expected_bytes(case, tsp_size)
        assert {op: n for op, n in forward_bytes.bytes_by_op.items() if n} == \
               {op: n for op, n in expected_forward.items() if n}, case
        assert {op: n for op, n in backward_bytes.bytes_by_op.items() if n} == \
               {op: n for op, n in expected_backward.items() if n}, case
        # three weight slots at most (one per call when one bucket's kept weights are views of them); one
        # call's grads at a time (the previous call's reduces end before the next call's begin); one call
        # gathers and reduce-scatters without slots
        weight_slots = calls if case.keep_weights and case.buckets_per_call == 1 else min(calls, 3)
        assert dict(residency.peak) == ({} if calls == 1 else {"weight": weight_slots, "grad": 1}), case


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_attention_matches_dense(tsp_size: int) -> None:
    run_on_ranks(_run_cases, tsp_size)


def _run_bf16_cases_as_on_cuda(rank: int, tsp_size: int) -> None:
    # one call's weight grads, and (D > 1) the later calls' terms GEMM-added into the fp32 sums
    taken = ("aten.mm.dtype", "aten.addmm.dtype_out") if tsp_size > 1 else ("aten.mm.dtype",)
    run_on_cudas_gemm_path(_run_cases, rank, tsp_size, taken)


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_attention_matches_dense_with_cudas_fp32_gemms(tsp_size: int) -> None:
    """The bf16 cases on the path a GPU takes: weight grads out of their GEMMs in fp32 (one call), each later
    bucket's projection and input grad added into the fp32 sum by its GEMM (several calls)."""
    run_on_ranks(_run_bf16_cases_as_on_cuda, tsp_size)


def test_apply_rotary_matches_megatron() -> None:
    """Our RoPE, from the angles or from cos/sin made once per layer (the sign folded in), gives Megatron's
    unfused values exactly (fp32 angles with fp32/bf16 activations, as in training, and fp64), rotating all
    or half the channels, on [s, b, n, hd] and on the [s, b, groups, heads, hd] that TSP attention rotates;
    a per-head RoPE function (Megatron's) wrapped by per_head_rotary gives the same on the latter."""
    for dtype, angle_dtype in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                               (torch.bfloat16, torch.float32)):
        t = torch.randn(6, 2, 6, 8, dtype=dtype)
        grouped = t.view(6, 2, 2, 3, 8)[:, :, :, :2]  # a strided view, as q|k of a group of 2 is
        for rot_dim in (8, 4):
            angles = _rope_angles(6, rot_dim, angle_dtype)
            expected = _apply_rotary_pos_emb_bshd(t, angles)
            assert torch.equal(apply_rotary(t, angles), expected), (dtype, rot_dim)
            assert torch.equal(apply_rotary_cos_sin(t, rotary_cos_sin(angles, dtype)), expected), (dtype, rot_dim)
            expected = _apply_rotary_pos_emb_bshd(grouped.flatten(2, 3), angles).view(grouped.shape)
            assert torch.equal(apply_rotary_cos_sin(grouped, rotary_cos_sin(angles, dtype)), expected)
            for interleaved in (False, True):  # each head rotated on its own, as the wrapped function would
                megatron_rope = partial(_apply_rotary_pos_emb_bshd, rotary_interleaved=interleaved)
                per_head = torch.stack([megatron_rope(grouped[:, :, :, j], angles) for j in range(2)], dim=3)
                assert torch.equal(per_head_rotary(megatron_rope)(grouped, angles), per_head), interleaved


def test_causal_attention_by_position_any_order() -> None:
    """Shuffled positions and GQA against an explicit softmax with the matching mask."""
    torch.manual_seed(0)
    sq, sk, batch, heads, kv_heads, hd = 5, 9, 2, 4, 2, 8
    k_positions = torch.randperm(sk)
    q_positions = k_positions[torch.randperm(sk)[:sq]]
    q = torch.randn(sq, batch, heads, hd, dtype=torch.float64)
    k, v = torch.randn(2, sk, batch, kv_heads, hd, dtype=torch.float64)
    out = causal_attention(q, k, v, q_positions, k_positions, 0.3)
    for i in range(sq):
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            visible = k_positions <= q_positions[i]
            probs = torch.einsum("tbd,bd->tb", k[visible, :, kv_head], q[i, :, head]).mul(0.3).softmax(dim=0)
            expected = torch.einsum("tb,tbd->bd", probs, v[visible, :, kv_head])
            torch.testing.assert_close(out[i, :, head * hd:(head + 1) * hd], expected)
