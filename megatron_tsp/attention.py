"""TSP self-attention: weights move by broadcast, each rank computes its own tokens for every head bucket.

Rank p of a TSP group of size D holds its tokens ``x [S/D, B, h]`` (zigzag order, see ``zigzag.py``) and
the tensor-parallel shard p of the attention weights, in Megatron's layout (degree D):

- ``linear_qkv.weight`` ``[(nq/D + 2*nkv/D)*hd, h]``, grouped-interleaved: for each local kv group, the
  group's nq/nkv query heads' rows, then its k rows (hd), then its v rows (hd); ``linear_qkv.bias`` has the
  same rows;
- ``linear_proj.weight`` ``[h, nq/D*hd]`` (its bias is replicated and added by the caller).

Head bucket r is the shard TP rank r owns; :class:`TSPAttentionFunction` walks the buckets (TSP.md).

Communication per rank per layer, bytes, for element size e (activations and weights), e_acc (the grad
accumulation dtype: fp32 for bf16/fp16 params, else the param dtype), W = (2 + 2/g)*h^2 weight elements
(plus (1 + 2/g)*h for the qkv bias), g = nq/nkv, and K/V = 2*B*S*h/g elements (h = nq*hd):

- forward:  broadcast W*e*(D-1)/D;  all_gather K/V*e*(D-1)/D.
- backward: broadcast W*e*(D-1)/D (weights re-fetched);  all_gather K/V*e*(D-1)/D (a bucket's gathered
  K/V are never kept);  reduce_scatter K/V*e*(D-1)/D (dK/dV back to the token owners);
  reduce W*e_acc*(D-1)/D (each bucket's weight grad summed into its owner). With ``keep_weights``
  (``--tsp-keep-weight-shards``) the forward keeps every bucket's weights (D weight buffers, W*e per layer,
  alive until the layer's backward) and backward broadcasts nothing. K/V travel chunk-major
  (``comm.all_gather_zigzag``, two half-size calls; dK/dV by its transpose) so that the kernel reads them in
  place.

Calls (``buckets_per_call`` = G, ``--tsp-attention-buckets-per-call``): the schedule runs D/G attention calls,
each over G consecutive head buckets, as if one bucket held G*nq/D heads: the G owners broadcast their shards
into one slot (one message each), the call's qkv GEMM, K/V all-gather, core-attention kernel, output GEMM
and, in backward, reduce-scatter and weight-grad GEMMs each run once for the G buckets, and the weight grads
are reduced to the G owners (one message each). Megatron's grouped qkv layout stacks shard by shard, so the
G shards' rows and proj columns concatenated (one strided copy per tensor) are the call's weights. With
G = D there is one call, and each weight tensor is all-gathered straight into its full layout instead (proj
sent transposed; no slot, no copy) and its grad reduce-scattered from it. Bytes are unchanged (with G = D
counted as all_gather and reduce_scatter). G = 1 is TSP.md's schedule; larger G issues about G times fewer
operators per attention layer (a short sequence's step is bound by their launch cost), for G times larger
transients (below), and with G = D nothing overlaps the one K/V gather (below). The calls' output
projections (and in backward their input grads) are summed in fp32 for 16-bit activations, starting from the
first call's, each later call's GEMM adding into the sum (``grads.add_linear_``); one call's is the output as
it is.

Overlap: call r+1's K/V all-gather (the largest transfer at long context) and call r+2's weights (into a
third slot) are in flight while call r's attention computes, forward and backward (backward rebuilds call
r+1's K/V from the kept projection, without its weights, which it waits for only when it differentiates
call r+1). Backward runs each call in two halves: the output projection's and core attention's grads, which
start dK/dV's reduce-scatter, then, once call r+1's first half has been issued, call r's second half (the
q/k norms, RoPE and the qkv GEMMs' grads), which needs dK/dV; call r's weight-grad reduces are issued
before its input grad's GEMM and run on while call r+1 computes. So only the first call's weights are
waited for with no compute in between. With one call its qkv weights, K/V and dK/dV are waited for at once,
while proj's gather runs during the attention kernel (in backward the other way round: proj's is needed
first). A caller's ``prefetch`` (the layer's gathered MLP's fc1 weights, specs.py) is issued behind the last
call's K/V gather, so it delays none of attention's transfers and travels during its last kernel and GEMM.
``cost.tsp_attention_comm`` models exactly this, and tests/test_comm_overlap.py holds it to
``comm.track_overlap``'s measure.

Memory: forward saves the local input ``x`` (plus the replicated q/k-norm params, the local rotary angles
and the positions) and, when it will be differentiated, each call's qkv projection of the local tokens,
core-attention output and log-sum-exp (``[S/D, B, (nq + 2*nkv)*hd]``, ``[S/D, B, h]`` and
``[B, nq, S/D]`` per layer in all, what Megatron's attention keeps for the same tokens), so that backward
runs no GEMM and no attention forward again: it re-applies the q/k norms and RoPE (elementwise), re-gathers
each call's K/V and differentiates the projections by hand. Three calls' weight shards (three slots of G
shards, plus with G > 1 the concatenated copies of the calls under way; with one call the gathered weights;
D shards' worth with ``keep_weights``, kept in the calls' layout) are alive at a time, and two calls'
full-sequence K/V (the one attended and the next in flight), plus in backward the grad of one and, with
several calls, the previous call's on its way to the tokens' owners.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import (
    Pending,
    ShardLayout,
    all_gather_linear_pair,
    all_gather_zigzag,
    broadcast_parts,
    group_rank,
    group_size,
    reduce_parts,
    reduce_scatter_seq,
    reduce_scatter_zigzag,
    shard_buffer,
)
from megatron_tsp.grads import (
    add_linear_,
    linear_weight_grads,
    needs_backward,
    weight_grad_for_autograd,
)
from megatron_tsp.kernels import ZIGZAG, AttentionBackend, packed_kv

__all__ = [
    "QKNorm",
    "TSPAttentionFunction",
    "apply_rotary",
    "apply_rotary_cos_sin",
    "head_layer_norm",
    "head_rms_norm",
    "per_head_rotary",
    "rotary_cos_sin",
    "tsp_attention",
]

RotaryFn = Callable[[Tensor, Tensor], Tensor]  # (t [s, b, ..., hd], what rotary_freqs holds) -> t's shape
HeadNormFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def apply_rotary(t: Tensor, freqs: Tensor) -> Tensor:
    """Megatron's non-interleaved RoPE: t ``[s, b, ..., hd]`` (any number of head dims), freqs
    ``[s, 1, 1, rot_dim]`` -> t's shape.

    ``freqs`` are angles laid out as cat(f, f); rotate-half acts on the first rot_dim channels of each head
    and the rest pass through (``--rotary-percent`` < 1).
    """
    return apply_rotary_cos_sin(t, rotary_cos_sin(freqs, t.dtype))


def rotary_cos_sin(freqs: Tensor, dtype: torch.dtype) -> Tensor:
    """RoPE angles ``[s, 1, 1, rot_dim]`` -> their cos and sin in ``dtype`` (as Megatron's unfused RoPE rounds
    them), stacked ``[2, s, 1, 1, rot_dim]``, the sin's first half negated: rotate-half's negation folded into
    the table, exactly (-(a*b) = a*(-b) in floating point). The TSP layers make it once per angle table
    (specs.py) instead of once per call, layer and pass."""
    sin = freqs.sin()
    half = freqs.shape[-1] // 2
    return torch.stack((freqs.cos(), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))).to(dtype)


def apply_rotary_cos_sin(t: Tensor, cos_sin: Tensor) -> Tensor:
    """:func:`apply_rotary` from :func:`rotary_cos_sin`'s table: Megatron's operations in Megatron's order
    (so the same values) but the negation, which the table holds; no concatenation when every channel
    rotates."""
    rot_dim = cos_sin.shape[-1]
    cos, sin = cos_sin.reshape(2, t.shape[0], *(1,) * (t.dim() - 2), rot_dim)  # broadcast over t's middle dims
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    first, second = t_rot.chunk(2, dim=-1)
    rotated = t_rot * cos + torch.cat((second, first), dim=-1) * sin
    return rotated if t_pass.shape[-1] == 0 else torch.cat((rotated, t_pass), dim=-1)


def per_head_rotary(fn: Callable[[Tensor, Tensor], Tensor]) -> RotaryFn:
    """A RoPE function of ``[s, b, heads, hd]`` tensors (e.g. Megatron's fused or interleaved
    ``apply_rotary_pos_emb``) as a :data:`RotaryFn`, which TSP attention calls once on q and k together,
    ``[s, b, kv groups, heads per group + 1, hd]``: the head dims are flattened (a copy) and restored."""
    def rotary(t: Tensor, freqs: Tensor) -> Tensor:
        return fn(t.flatten(2, -2), freqs).unflatten(2, t.shape[2:-1])
    return rotary


def head_layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (a head's hd channels): x ``[..., hd]``, weight/bias ``[hd]``."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def head_rms_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim (a head's hd channels): x ``[..., hd]``, weight (and optional bias) ``[hd]``."""
    normed = F.rms_norm(x, x.shape[-1:], weight, eps)
    return normed if bias is None else normed + bias


@dataclass(frozen=True)
class QKNorm:
    """Megatron's ``--qk-layernorm``: a per-head norm over hd on q and on k, with replicated params.

    ``fn(x [..., hd], weight [hd], bias [hd] | None)`` is any such norm (:func:`head_layer_norm`,
    :func:`head_rms_norm`, or a functional wrapper of Megatron's norm module).
    """

    fn: HeadNormFn
    q_weight: Tensor
    k_weight: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None


@dataclass(frozen=True)
class _CallSpec:
    """Everything about one attention call's math that is not a tensor. A call covers ``buckets_per_call``
    consecutive head buckets (G); ``heads``/``kv_heads`` count the call's heads, G*nq/D and G*nkv/D."""

    tsp_group: dist.ProcessGroup
    heads: int  # query heads per call, G*nq/D
    kv_heads: int  # kv heads per call, G*nkv/D
    head_dim: int
    softmax_scale: float
    has_qkv_bias: bool
    norm_fn: HeadNormFn | None
    rotary_fn: RotaryFn
    core_attention: AttentionBackend
    buckets_per_call: int = 1  # G, --tsp-attention-buckets-per-call
    keep_weights: bool = False  # keep every bucket's fetched weights for backward (no re-fetch)
    keep_activations: bool = False  # keep every call's projection, attention output, LSE (differentiated)
    # started in forward once the last call's K/V gather is issued (the next module's weights, specs.py)
    prefetch: Callable[[], None] | None = None

    @property
    def calls(self) -> int:
        """Attention calls per pass, D/G."""
        return group_size(self.tsp_group) // self.buckets_per_call

    def buckets(self, call: int) -> list[int]:
        """The head buckets (= their owners' TSP ranks) of call ``call``."""
        return list(range(call * self.buckets_per_call, (call + 1) * self.buckets_per_call))


def _split_heads(projection: Tensor, norm_params: list[Tensor | None], rotary_freqs: Tensor | None,
                 spec: _CallSpec) -> tuple[Tensor, Tensor, Tensor]:
    """One call's qkv projection of the local tokens ``[sq, b, (nq + 2*nkv)*hd]`` (the call's heads, in
    Megatron's grouped layout) -> q ``[sq, b, nq, hd]`` and k, v ``[sq, b, nkv, hd]``, q/k-normed and rotated.

    A kv group's query heads and its k head are adjacent in that layout, so q and k take one RoPE call
    together (as ``[sq, b, nkv, g+1, hd]``), not one each; splits rather than slices, whose grads autograd
    joins with one concatenation.
    """
    sq, batch, _ = projection.shape
    group_size = spec.heads // spec.kv_heads
    grouped = projection.view(sq, batch, spec.kv_heads, group_size + 2, spec.head_dim)
    qk, v = grouped.split([group_size + 1, 1], dim=3)
    if spec.norm_fn is not None:
        q_weight, q_bias, k_weight, k_bias = norm_params
        q, k = qk.split([group_size, 1], dim=3)
        qk = torch.cat((spec.norm_fn(q, q_weight, q_bias), spec.norm_fn(k, k_weight, k_bias)), dim=3)
    if rotary_freqs is not None:  # at the tokens' global positions: rotary_freqs are the local tokens' angles
        qk = spec.rotary_fn(qk, rotary_freqs)
    q, k = qk.split([group_size, 1], dim=3)
    return q.flatten(2, 3), k.squeeze(3), v.squeeze(3)  # q: a copy for GQA (as Megatron's reshape)


class _CallWeights:
    """A call's weights on their way (:func:`_fetch_call`): :meth:`qkv` and :meth:`proj` each wait for what
    they need and give it in the call's layout, once (what they give is kept, so a call kept for backward
    needs nothing more; the in-flight buffers are let go once both have been asked for)."""

    def __init__(self, qkv: Callable[[], tuple[Tensor, Tensor | None]], proj: Callable[[], Tensor]) -> None:
        self._arriving: list[Callable[[], object] | None] = [qkv, proj]
        self._arrived: list[object] = [None, None]

    def _get(self, index: int) -> object:
        if self._arrived[index] is None:
            self._arrived[index] = self._arriving[index]()
            self._arriving[index] = None
        return self._arrived[index]

    def qkv(self) -> tuple[Tensor, Tensor | None]:
        """The qkv weight ``[(nq + 2*nkv)*hd, h]`` and its bias (or None), for the call's heads."""
        return self._get(0)

    def proj(self) -> Tensor:
        """The output-projection weight ``[h, nq*hd]``, for the call's heads."""
        return self._get(1)


def _fetch_call(call: int, own_shard: list[Tensor], layout: ShardLayout, slots: list[Tensor],
                spec: _CallSpec) -> _CallWeights:
    """Start fetching call ``call``'s weights.

    One call over all D buckets: each tensor is all-gathered straight into its full layout (Megatron's qkv
    shards stacked in rank order are the full grouped layout; proj travels transposed), no slot and no copy,
    and each is waited for on its own (proj's gather is still in flight while the qkv GEMM and the attention
    kernel run). Otherwise the packed [Wqkv, bqkv, Wo] of each of the call's G buckets is broadcast from its
    owner into the call's slot, ``slots[call mod len(slots)]`` (three slots take turns, or with one slot per
    call each keeps its own), and :func:`_call_qkv` and :func:`_call_proj` lay the G shards out as one call's.
    """
    if spec.calls == 1:
        qkv_gather, bias_gather, proj_gather = all_gather_linear_pair(*_qkv_bias_proj(own_shard, spec),
                                                                      spec.tsp_group)
        return _CallWeights(lambda: (qkv_gather.wait(), None if bias_gather is None else bias_gather.wait()),
                            lambda: proj_gather.wait().t())
    slot, buckets = slots[call % len(slots)], spec.buckets(call)
    tsp_rank = group_rank(spec.tsp_group)
    if tsp_rank in buckets:
        layout.pack(own_shard, slot.chunk(spec.buckets_per_call)[buckets.index(tsp_rank)])
    broadcasts = broadcast_parts(slot, buckets, spec.tsp_group)

    def shards() -> tuple[Tensor, Tensor | None, Tensor]:  # [G, *shape] views of the slot, per tensor
        return _qkv_bias_proj(layout.unpack_stacked(broadcasts.wait(), spec.buckets_per_call), spec)
    return _CallWeights(lambda: _call_qkv(*shards()[:2]), lambda: _call_proj(shards()[2]))


def _call_qkv(qkv_weight: Tensor, qkv_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A call's qkv weight and bias from its G packed shards' ``[G, rows, h]`` and ``[G, rows]`` views:
    Megatron's qkv layout is grouped per kv group, so the G shards' rows stacked are the layout of the call's
    G*nkv/D groups (a view for one bucket per call, else a copy the G shards' size)."""
    return qkv_weight.contiguous().flatten(0, 1), None if qkv_bias is None else qkv_bias.contiguous().flatten()


def _call_proj(proj_weight: Tensor) -> Tensor:
    """A call's proj weight from its G packed shards' ``[G, h, c]`` view: their columns side by side match the
    call's heads, ``[h, G*c]`` (a view for one bucket per call, else a copy)."""
    # .contiguous() copies only for G > 1 (a size-1 dim's stride does not count)
    return proj_weight.transpose(0, 1).contiguous().flatten(1)


def _stacked_grads(call_grads: list[Tensor], spec: _CallSpec) -> list[Tensor]:
    """The transpose of :func:`_call_qkv` and :func:`_call_proj` for grads: a call's [qkv weight, (qkv bias,)
    proj weight] grads as ``[G, *shape]`` views in pack order, bucket j's at j (for
    :meth:`ShardLayout.unpack_stacked`)."""
    qkv_weight, qkv_bias, proj_weight = _qkv_bias_proj(call_grads, spec)
    g = spec.buckets_per_call
    stacked = [qkv_weight.unflatten(0, (g, -1)), None if qkv_bias is None else qkv_bias.unflatten(0, (g, -1)),
               proj_weight.unflatten(1, (g, -1)).transpose(0, 1)]  # [h, G*c] -> [G, h, c]
    return [t for t in stacked if t is not None]


def _start_call(weights: _CallWeights, x: Tensor, norm_params: list[Tensor | None], rotary_freqs: Tensor | None,
                spec: _CallSpec) -> tuple[Tensor, Tensor, Pending]:
    """Wait for a call's qkv weights, project the local tokens and start gathering the call's K/V.

    Returns the qkv projection ``[S/D, B, (nq + 2*nkv)*hd]``, q ``[S/D, B, nq, hd]`` and the pending
    chunk-major all-gather of cat(k, v) ``[S, B, 2*nkv, hd]`` (the call's heads).
    """
    projection = F.linear(x, *weights.qkv())
    q, k, v = _split_heads(projection, norm_params, rotary_freqs, spec)
    return projection, q, all_gather_zigzag(torch.cat((k, v), dim=2), spec.tsp_group)


def _restart_call(projection: Tensor, norm_params: list[Tensor | None], rotary_freqs: Tensor | None,
                  spec: _CallSpec) -> tuple:
    """Backward's :func:`_start_call`, from forward's kept projection (so without the call's weights, which
    :func:`_attention_backward` waits for): q/k/v rebuilt on detached leaves (the projection and the q/k-norm
    params, so that grads land on them, not on the Function's inputs, which must get exactly one grad
    each), and the pending all-gather of K/V (a detached copy, whose grad comes back by reduce-scatter).

    Returns (leaf projection, leaf q/k-norm params, (q, k, v), pending K/V gather). The GEMMs' grads are
    computed by hand (no graph).
    """
    with torch.enable_grad():
        leaf_projection = projection.detach().requires_grad_()
        leaf_norm = [None if p is None else p.detach().requires_grad_() for p in norm_params]
        q, k, v = _split_heads(leaf_projection, leaf_norm, rotary_freqs, spec)
    kv_gather = all_gather_zigzag(torch.cat((k, v), dim=2).detach(), spec.tsp_group)
    return leaf_projection, leaf_norm, (q, k, v), kv_gather


def _attention_backward(restarted: tuple, weights: _CallWeights, kept_attention: tuple[Tensor, ...],
                        grad_out: Tensor, q_positions: Tensor, k_positions: Tensor, spec: _CallSpec) -> tuple:
    """The first half of a call's grads from this rank's tokens: the output projection's and the core
    attention's from forward's kept output and LSE (the attention is not recomputed), and the start of
    dK/dV's reduce-scatter to the tokens' owners (the gather's transpose), which the next call's attention
    backward hides. Returns what :func:`_finish_call_backward` takes: (leaf projection, leaf q/k-norm params,
    (q, k, v), grad q, pending dK/dV, grad proj weight). A function of its own so that its temporaries (the
    gathered K/V, the attention-output grad) are freed when it returns."""
    leaf_projection, leaf_norm, qkv, kv_gather = restarted
    attn = kept_attention[0]  # [S/D, B, nq*hd]
    grad_attn = grad_out @ weights.proj()  # out = attn @ proj_weight^T
    if spec.calls == 1:  # transposed, [nq*hd, h]: the layout its reduce-scatter sends
        grad_proj = linear_weight_grads(attn, grad_out, dtype=_call_grads_dtype(attn.dtype, spec))
    else:
        grad_proj = linear_weight_grads(grad_out, attn)
    full_k, full_v = kv_gather.wait().chunk(2, dim=2)
    grad_q, grad_full_k, grad_full_v = spec.core_attention.backward(
        grad_attn, qkv[0], full_k, full_v, *kept_attention, q_positions, k_positions, spec.softmax_scale)
    grad_full_kv = packed_kv(grad_full_k, grad_full_v)  # the zigzag backend's are packed already
    return leaf_projection, leaf_norm, qkv, grad_q, reduce_scatter_zigzag(grad_full_kv, spec.tsp_group), grad_proj


def _finish_call_backward(x: Tensor, attention_grads: tuple,
                          spec: _CallSpec) -> tuple[Tensor, list[Tensor | None], list[Tensor]]:
    """The second half of a call's grads, once its dK/dV have arrived: through the q/k norms and RoPE to the
    qkv projection, and its GEMM's weight grads. Returns the projection's grad ``[S/D, B, (nq + 2*nkv)*hd]``
    (the input grad's GEMM is the caller's, so that the weight grads' reduce can run during it), the call's
    q/k-norm param grads (None where there is no such param) and weight grads in pack order (their dtype and
    proj's layout: :func:`_call_grads_dtype`)."""
    leaf_projection, leaf_norm, (q, k, v), grad_q, dkv_scatter, grad_proj = attention_grads
    grad_k, grad_v = dkv_scatter.wait().chunk(2, dim=2)
    local_leaves = [leaf_projection] + leaf_norm
    local_grads = iter(torch.autograd.grad([q, k, v], [t for t in local_leaves if t is not None],
                                           [grad_q, grad_k, grad_v]))
    grad_projection, *grad_norm = [None if t is None else next(local_grads) for t in local_leaves]
    weight_grads = linear_weight_grads(grad_projection, x, spec.has_qkv_bias, _call_grads_dtype(x.dtype, spec))
    return grad_projection, grad_norm, [*weight_grads, *grad_proj]


def _call_grads_dtype(dtype: torch.dtype, spec: _CallSpec) -> torch.dtype:
    """The dtype of a call's weight grads for weights of ``dtype``: with one call, that of their sum over the
    ranks (>= fp32), as the GEMMs can write it and the reduce-scatter sends it; with several, ``dtype``, as
    :func:`_reduce_call_grads` packs them into its >= fp32 buffer with one casting copy anyway."""
    return torch.promote_types(dtype, torch.float32) if spec.calls == 1 else dtype


def _accumulate(total: Tensor | None, part: Tensor, parts: int) -> Tensor:
    """``total + part`` over a sum of ``parts`` terms, kept in >= fp32: the first term starts the sum (no zero
    fill), and a lone term is the sum as it is (a 16-bit GEMM result needs no fp32 round trip)."""
    if total is None:
        return part if parts == 1 else part.to(torch.promote_types(part.dtype, torch.float32))
    return total.add_(part)


def _accumulate_linear(total: Tensor | None, x: Tensor, weight: Tensor, parts: int) -> Tensor:
    """:func:`_accumulate` of the term ``x @ weight^T``, which after the first one the GEMM adds into the
    sum itself (:func:`~megatron_tsp.grads.add_linear_`)."""
    if total is None:
        return _accumulate(None, F.linear(x, weight), parts)
    return add_linear_(total, x, weight)


def _qkv_bias_proj(parts: list[Tensor], spec: _CallSpec) -> tuple[Tensor, Tensor | None, Tensor]:
    """(qkv weight, qkv bias or None, proj weight) from a shard's tensors (or their grads), in pack order."""
    return (parts[0], parts[1], parts[2]) if spec.has_qkv_bias else (parts[0], None, parts[1])


def _reduce_call_grads(call: int, call_grads: list[Tensor], layout: ShardLayout, spec: _CallSpec,
                       acc_dtype: torch.dtype) -> Callable[[], list[Tensor]]:
    """Start summing call ``call``'s weight grads (this rank's tokens, the call's layout) into their owners, in
    ``acc_dtype``; the returned function waits and gives this rank's own summed grads in pack order if it
    owns one of the call's buckets, else [].

    One call: each tensor is reduce-scattered from its full layout as the GEMMs wrote it (in ``acc_dtype``,
    proj's transposed: :func:`_call_grads_dtype`), the transpose of :func:`_fetch_call`'s gathers. Otherwise
    the grads are copied into one buffer of the call's G packed shards (a strided, casting copy per tensor)
    and reduced part by part to their owners, and the owner copies its part out, so that the buffer is freed
    once the function has run.
    """
    if spec.calls == 1:
        scatters = [reduce_scatter_seq(g, spec.tsp_group) for g in _qkv_bias_proj(call_grads, spec) if g is not None]

        def own_scattered() -> list[Tensor]:
            *qkv, proj_transposed = (pending.wait() for pending in scatters)
            return [*qkv, proj_transposed.t()]
        return own_scattered
    grad_buffer = shard_buffer(spec.buckets_per_call * layout.numel, acc_dtype, call_grads[0].device, "grad")
    for view, grad in zip(layout.unpack_stacked(grad_buffer, spec.buckets_per_call),
                          _stacked_grads(call_grads, spec), strict=True):
        view.copy_(grad)
    reduces = reduce_parts(grad_buffer, spec.buckets(call), spec.tsp_group)
    owner = group_rank(spec.tsp_group) in spec.buckets(call)

    def own_reduced() -> list[Tensor]:
        summed = reduces.wait()
        return [g.clone() for g in layout.unpack(summed)] if owner else []
    return own_reduced


class TSPAttentionFunction(torch.autograd.Function):
    """The TSP attention schedule, forward and backward; see the module docstring for bytes and memory.

    Inputs: x ``[S/D, B, h]``, qkv_weight, qkv_bias (or None), proj_weight (Megatron TP shards), the four
    q/k-norm params (or None), rotary_freqs (what ``spec.rotary_fn`` takes, or None), q_positions ``[S/D]``,
    k_positions ``[S]`` (global positions of the local and of the chunk-major gathered tokens), spec.
    Output ``[S/D, B, h]`` without the proj bias. Every tensor input that needs a grad gets it exactly once.
    q/k-norm param grads are this rank's partial sums (its tokens): like every replicated token-local param
    they must be summed over the TSP group (Megatron: tag them ``sequence_parallel``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                q_norm_weight: Tensor | None, q_norm_bias: Tensor | None, k_norm_weight: Tensor | None,
                k_norm_bias: Tensor | None, rotary_freqs: Tensor | None, q_positions: Tensor,
                k_positions: Tensor, spec: _CallSpec) -> Tensor:
        own_shard = [t for t in (qkv_weight, qkv_bias, proj_weight) if t is not None]
        layout = ShardLayout([t.shape for t in own_shard])
        norm_params = [q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias]
        num_calls = spec.calls
        # kept weights of one bucket per call are views of their slot: one slot per call then
        views_kept = spec.keep_weights and spec.buckets_per_call == 1
        num_slots = 0 if num_calls == 1 else num_calls if views_kept else min(num_calls, 3)
        slot_numel = spec.buckets_per_call * layout.numel
        slots = [shard_buffer(slot_numel, qkv_weight.dtype, x.device, "weight") for _ in range(num_slots)]
        kept_weights: list[_CallWeights] = []  # every call's, with spec.keep_weights

        out = None  # the calls' output projections summed (in >= fp32 over several calls)
        # per call: its projection, then the core attention's [S/D, B, G*nq/D*hd] output and its LSE
        kept_activations: list[tuple[Tensor, tuple[Tensor, ...]] | None] = []
        fetches = {call: _fetch_call(call, own_shard, layout, slots, spec) for call in range(min(num_calls, 2))}
        started = _start_call(fetches[0], x, norm_params, rotary_freqs, spec)
        for call in range(num_calls):
            projection, q, kv_gather = started
            if call + 1 < num_calls:  # the next call's K/V travel while this call's attention computes
                started = _start_call(fetches[call + 1], x, norm_params, rotary_freqs, spec)
            if call + 2 < num_calls:  # and the weights of the call after it, into the third slot
                fetches[call + 2] = _fetch_call(call + 2, own_shard, layout, slots, spec)
            if call + 1 == num_calls and spec.prefetch is not None:  # behind every transfer of this layer's
                spec.prefetch()
            full_k, full_v = kv_gather.wait().chunk(2, dim=2)  # [S, B, G*nkv/D, hd] each
            attn, *saved = spec.core_attention.forward(q, full_k, full_v, q_positions, k_positions,
                                                       spec.softmax_scale)
            weights = fetches.pop(call)
            out = _accumulate_linear(out, attn, weights.proj(), num_calls)
            if spec.keep_activations:
                kept_activations.append((projection, (attn, *saved)))
            if spec.keep_weights:
                kept_weights.append(weights)
            del projection, weights

        ctx.spec = spec
        ctx.kept_weights = kept_weights if spec.keep_weights else None
        ctx.kept_activations = kept_activations if spec.keep_activations else None
        ctx.save_for_backward(x, qkv_weight, qkv_bias, proj_weight, *norm_params, rotary_freqs, q_positions,
                              k_positions)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _CallSpec = ctx.spec
        (x, qkv_weight, qkv_bias, proj_weight, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
         rotary_freqs, q_positions, k_positions) = ctx.saved_tensors
        own_shard = [t for t in (qkv_weight, qkv_bias, proj_weight) if t is not None]
        layout = ShardLayout([t.shape for t in own_shard])
        norm_params = [q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias]
        num_calls = spec.calls
        acc_dtype = torch.promote_types(qkv_weight.dtype, torch.float32)
        kept, ctx.kept_weights = ctx.kept_weights, None  # freed with this frame
        kept_activations, ctx.kept_activations = ctx.kept_activations, None  # each call's freed after its use
        if kept_activations is None:
            raise RuntimeError("TSP attention backward without forward's activations: it runs once per forward "
                               "(no retain_graph), from a forward that ran with grad enabled")
        slots = []
        if kept is None and num_calls > 1:
            slots = [shard_buffer(spec.buckets_per_call * layout.numel, qkv_weight.dtype, x.device, "weight")
                     for _ in range(min(num_calls, 3))]

        def fetch_call(call: int) -> _CallWeights:
            return kept[call] if kept is not None else _fetch_call(call, own_shard, layout, slots, spec)

        def restart_call(call: int) -> tuple:
            return _restart_call(kept_activations[call][0], norm_params, rotary_freqs, spec)

        grad_x = None  # the calls' input grads summed (in >= fp32 over several calls), and the q/k norms'
        grad_norm: list[Tensor | None] = [None] * len(norm_params)
        own_grads: list[Tensor] = []
        reducing: Callable[[], list[Tensor]] | None = None  # the previous call's in-flight weight-grad reduces

        def finish_call(call: int, weights: _CallWeights, attention_grads: tuple) -> None:
            """A call's second half: its weight grads on their way to their owners during its input grad's
            GEMM (the previous call's, which this call's computing overlapped, end first)."""
            nonlocal grad_x, grad_norm, reducing, own_grads
            grad_projection, grad_norm_call, call_grads = _finish_call_backward(x, attention_grads, spec)
            grad_norm = [total if part is None else _accumulate(total, part, num_calls)
                         for total, part in zip(grad_norm, grad_norm_call)]
            if reducing is not None:  # their buffer goes before this call's is made
                own_grads += reducing()
                reducing = None
            reducing = _reduce_call_grads(call, call_grads, layout, spec, acc_dtype)
            del call_grads  # only the in-flight reduces hold them now
            grad_x = _accumulate_linear(grad_x, grad_projection, weights.qkv()[0].t(), num_calls)  # += .. @ W

        fetches = {call: fetch_call(call) for call in range(min(num_calls, 2))}
        started = restart_call(0)
        unfinished = None  # the previous call's (call, weights, attention grads), its dK/dV in flight
        for call in range(num_calls):
            restarted = started
            if call + 1 < num_calls:  # the next call's K/V travel while this call's attention differentiates
                started = restart_call(call + 1)
            weights = fetches.pop(call)
            attention_grads = _attention_backward(restarted, weights, kept_activations[call][1], grad_out,
                                                  q_positions, k_positions, spec)
            kept_activations[call] = None
            del restarted
            if unfinished is not None:  # its dK/dV travelled while this call's attention differentiated
                finish_call(*unfinished)
            unfinished = (call, weights, attention_grads)
            del weights, attention_grads
            if call + 2 < num_calls:  # the finished call's slot takes the weights of the call after next
                fetches[call + 2] = fetch_call(call + 2)
        finish_call(*unfinished)
        del unfinished
        own_grads += reducing()

        grad_weights = [weight_grad_for_autograd(param, grad) for param, grad in zip(own_shard, own_grads)]
        grad_qkv_weight, grad_qkv_bias, grad_proj_weight = _qkv_bias_proj(grad_weights, spec)
        grad_norm = [None if g is None else weight_grad_for_autograd(p, g) for g, p in zip(grad_norm, norm_params)]
        return (grad_x.to(x.dtype), grad_qkv_weight, grad_qkv_bias, grad_proj_weight, *grad_norm,
                None, None, None, None)


def tsp_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                  q_positions: Tensor, k_positions: Tensor, tsp_group: dist.ProcessGroup, num_heads: int,
                  num_kv_heads: int, *, softmax_scale: float | None = None, rotary_freqs: Tensor | None = None,
                  rotary_fn: RotaryFn = apply_rotary, qk_norm: QKNorm | None = None,
                  core_attention: AttentionBackend = ZIGZAG, keep_weights: bool = False,
                  buckets_per_call: int = 1, prefetch: Callable[[], None] | None = None) -> Tensor:
    """TSP self-attention of rank p's tokens: x ``[S/D, B, h]`` -> ``[S/D, B, h]`` (proj bias not added).

    ``qkv_weight``, ``qkv_bias``, ``proj_weight``: this rank's Megatron TP shards (module docstring);
    ``num_heads``/``num_kv_heads``: global nq/nkv, both divisible by D; ``q_positions [S/D]`` and
    ``k_positions [S]``: global positions of the local tokens and of the chunk-major gathered sequence
    (``zigzag.local_positions`` / ``zigzag.gathered_positions``); ``rotary_freqs``: the local tokens' RoPE
    angles ``[S/D, 1, 1, rot_dim]`` (or what ``rotary_fn`` takes instead, e.g. :func:`rotary_cos_sin`'s),
    applied with ``rotary_fn(t, rotary_freqs)``; ``softmax_scale`` defaults to
    1/sqrt(hd); ``keep_weights``: keep the D buckets' weights from forward to backward (D weight buffers
    instead of two) so that backward fetches nothing; ``buckets_per_call`` (G, dividing D): head buckets
    per attention call (module docstring, "Calls"); ``prefetch``: called once per forward, right after the
    last call's K/V gather is issued, to start the next module's weight transfers behind this layer's own
    (they travel while the last call's attention and output projection compute).
    """
    tsp_size = group_size(tsp_group)
    if num_heads % tsp_size or num_kv_heads % tsp_size:
        raise ValueError(f"TSP attention needs query heads ({num_heads}) and kv heads ({num_kv_heads}) "
                         f"divisible by the TSP size {tsp_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if buckets_per_call < 1 or tsp_size % buckets_per_call:
        raise ValueError(f"head buckets per attention call ({buckets_per_call}) must divide the TSP size "
                         f"{tsp_size}")
    heads, kv_heads = num_heads // tsp_size, num_kv_heads // tsp_size
    head_dim = proj_weight.shape[1] // heads
    expected_rows = (heads + 2 * kv_heads) * head_dim
    if qkv_weight.shape != (expected_rows, x.shape[-1]) or proj_weight.shape != (x.shape[-1], heads * head_dim):
        raise ValueError(f"weight shards {tuple(qkv_weight.shape)}, {tuple(proj_weight.shape)} do not match "
                         f"Megatron's TP layout [{expected_rows}, {x.shape[-1]}], [{x.shape[-1]}, {heads * head_dim}]")
    norm_params = [None] * 4 if qk_norm is None else [qk_norm.q_weight, qk_norm.q_bias, qk_norm.k_weight,
                                                      qk_norm.k_bias]
    spec = _CallSpec(tsp_group=tsp_group, heads=buckets_per_call * heads, kv_heads=buckets_per_call * kv_heads,
                     head_dim=head_dim,
                     softmax_scale=softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim),
                     has_qkv_bias=qkv_bias is not None, norm_fn=None if qk_norm is None else qk_norm.fn,
                     rotary_fn=rotary_fn, core_attention=core_attention, buckets_per_call=buckets_per_call,
                     keep_weights=keep_weights,
                     keep_activations=needs_backward(x, qkv_weight, qkv_bias, proj_weight, *norm_params),
                     prefetch=prefetch)
    return TSPAttentionFunction.apply(x, qkv_weight, qkv_bias, proj_weight, *norm_params, rotary_freqs,
                                      q_positions, k_positions, spec)
