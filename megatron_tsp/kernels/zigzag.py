"""Zigzag-aware core attention: each local query chunk as a non-causal prefix plus a causal diagonal.

Rank p of a TSP group of size D holds query chunks p and 2D-1-p (c = S/(2D) tokens each) and attends to the
gathered sequence. Query chunk j sees natural chunks 0 .. j-1 with no mask (the prefix) and chunk j with a
square top-left causal mask (the diagonal). K/V arrive chunk-major (``comm.all_gather_zigzag``: natural chunks
2D-1, ..., D, 0, ..., D-1), in which each of these parts is one contiguous key range (an unmasked part does not
care about key order), so the kernels read the gathered K/V in place. Each part is one attention call that
also returns its log-sum-exp (LSE), and a chunk's two parts merge exactly, ring-attention style:

    L = logaddexp(L_prefix, L_diag),    O = exp(L_prefix - L) * O_prefix + exp(L_diag - L) * O_diag.

So no [S/D, S] mask or score tensor ever exists, and keys in a chunk's future are never touched.

Backward needs only q, K/V, the merged O and L. Each part recomputes its probabilities against the *merged* L,
P = exp(scores - L), which are exactly its columns of the full softmax, and the flash-attention identity
dS = P * (dP - rowsum(dO * O)) with the merged O gives its exact share of dQ, dK, dV. (Differentiating through
the merge instead would need a differentiable LSE from the part kernel and would keep every part's
probabilities alive until backward.) Forward and backward are plain functions
(:func:`zigzag_attention_forward`, :func:`zigzag_attention_backward`) so that TSP attention can keep O and L
per head bucket and run only the backward; :func:`zigzag_causal_attention` wraps them in autograd.

Part kernels (:class:`PartKernel`, chosen by :func:`default_part_kernel`): on CPU, :data:`FUSED_CPU` (aten's
flash kernel, the one SDPA runs there); on NVIDIA GPUs in fp16/bf16, :data:`FUSED_CUDNN` (``cudnn.py``), checked
against the math kernel on the device before its first use; otherwise :func:`math_part_kernel`, exact and
memory-bounded but untuned. ``MEGATRON_TSP_PART_KERNEL=math`` forces the math kernel everywhere but on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from megatron_tsp.kernels import cudnn
from megatron_tsp.zigzag import gathered_positions, local_positions, zigzag_permutation

__all__ = ["FUSED_CPU", "FUSED_CUDNN", "PART_KERNEL_ENV", "PartKernel", "default_part_kernel", "math_part_kernel",
           "packed_kv", "zigzag_attention_backward", "zigzag_attention_forward", "zigzag_causal_attention"]

PartForward = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
PartBackward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class PartKernel:
    """Attention of one query chunk against one key range (top-left causal or unmasked), with its LSE.

    ``forward(q, k, v, causal, scale) -> (out, lse)``;
    ``backward(grad_out, q, k, v, out, lse, causal, scale) -> (grad_q, grad_k, grad_v)`` where ``out``/``lse``
    are the merged ones of the whole rows, so the grads are this part's share of the exact grads.
    q/out ``[b, nq, sq, hd]``, k/v ``[b, nkv, sk, hd]`` (query head i uses kv head i // (nq/nkv), Megatron's
    grouping), lse ``[b, nq, sq]`` in the accumulation dtype (fp32 for 16-bit inputs); sk >= 1.
    ``contiguous_rows``: the kernel copies strided q, out, dO and LSE rows into contiguous ones, so the zigzag
    functions hand it each query chunk's rows contiguous, copied once for the chunk's parts (not per part).
    """

    forward: PartForward
    backward: PartBackward
    contiguous_rows: bool = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fused_cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # The flash kernel that F.scaled_dot_product_attention itself runs on CPU, called directly because the
    # public function drops the LSE. It takes GQA and strided inputs as they are.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _fused_cpu_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


FUSED_CPU = PartKernel(_fused_cpu_forward, _fused_cpu_backward)
"""CPU parts by aten's flash kernel: blocked, so per-thread tiles are its only scratch memory."""


def _row_blocks(q: Tensor, k: Tensor, block_elements: int) -> list[slice]:
    """Query-row blocks whose score tile ``[b, nq, rows, sk]`` has at most ``block_elements`` (>= 1 row)."""
    batch, heads, rows, _ = q.shape
    step = max(1, block_elements // (batch * heads * k.shape[2]))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _block_scores(q_rows: Tensor, k: Tensor, rows: slice, causal: bool, scale: float) -> Tensor:
    """Scaled scores ``[b, nkv, g, r, sk]`` of grouped query rows ``[b, nkv, g, r, hd]`` (rows ``rows`` of the
    part) against k ``[b, nkv, sk, hd]``."""
    scores = (q_rows @ k.unsqueeze(2).transpose(-1, -2)).mul_(scale)  # k broadcast over the group: no copy
    if causal:  # top-left: query row i sees keys 0..i
        row_ids = torch.arange(rows.start, rows.stop, device=k.device)
        future = torch.arange(k.shape[2], device=k.device) > row_ids.unsqueeze(-1)
        scores.masked_fill_(future, float("-inf"))
    return scores


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, *,
                  block_elements: int) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    q_grouped = q.to(acc).unflatten(1, (kv_heads, heads // kv_heads))  # [b, nkv, g, sq, hd]
    k, v = k.to(acc), v.to(acc)
    out = torch.empty(q_grouped.shape, dtype=acc, device=q.device)
    lse = torch.empty(q_grouped.shape[:-1], dtype=acc, device=q.device)
    for rows in _row_blocks(q, k, block_elements):
        scores = _block_scores(q_grouped[..., rows, :], k, rows, causal, scale)
        lse[..., rows] = scores.logsumexp(dim=-1)
        out[..., rows, :] = (scores - lse[..., rows].unsqueeze(-1)).exp_() @ v.unsqueeze(2)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _math_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float, *, block_elements: int) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = (kv_heads, heads // kv_heads)
    q_grouped, grad_out_grouped = q.to(acc).unflatten(1, group), grad_out.to(acc).unflatten(1, group)
    lse_grouped = lse.to(acc).unflatten(1, group)
    delta = (grad_out_grouped * out.to(acc).unflatten(1, group)).sum(dim=-1)  # rowsum(dO * O), merged O
    k, v = k.to(acc), v.to(acc)
    grad_q = torch.empty(q_grouped.shape, dtype=acc, device=q.device)
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
    for rows in _row_blocks(q, k, block_elements):
        q_rows, grad_out_rows = q_grouped[..., rows, :], grad_out_grouped[..., rows, :]
        probs = (_block_scores(q_rows, k, rows, causal, scale) - lse_grouped[..., rows].unsqueeze(-1)).exp_()
        # dK/dV sum over the group's query heads: fold the group into the rows, one GEMM per kv head
        grad_v += probs.flatten(2, 3).transpose(-1, -2) @ grad_out_rows.flatten(2, 3)
        grad_scores = probs.mul_(grad_out_rows @ v.unsqueeze(2).transpose(-1, -2)
                                 - delta[..., rows].unsqueeze(-1)).mul_(scale)
        grad_q[..., rows, :] = grad_scores @ k.unsqueeze(2)
        grad_k += grad_scores.flatten(2, 3).transpose(-1, -2) @ q_rows.flatten(2, 3)
    return grad_q.flatten(1, 2), grad_k, grad_v


def math_part_kernel(block_elements: int = 1 << 24) -> PartKernel:
    """Explicit-softmax parts for any device and dtype, accumulating in >= fp32, over query-row blocks so that
    one score tile has at most ``block_elements`` elements (a few such tiles are alive at once)."""
    return PartKernel(partial(_math_forward, block_elements=block_elements),
                      partial(_math_backward, block_elements=block_elements))


FUSED_CUDNN = PartKernel(cudnn.forward, cudnn.backward, contiguous_rows=True)
"""NVIDIA GPU parts (fp16/bf16, head dim <= 128) by cuDNN's fused attention."""

PART_KERNEL_ENV = "MEGATRON_TSP_PART_KERNEL"
_CHECKED: set[tuple[torch.device, torch.dtype, int]] = set()


def default_part_kernel(q: Tensor) -> PartKernel:
    """The part kernel for queries like ``q`` (``[b, nq, sq, hd]``); see the module docstring."""
    if q.device.type == "cpu":
        return FUSED_CPU
    if os.environ.get(PART_KERNEL_ENV, "auto") != "math" and cudnn.supports(q):
        key = (q.device, q.dtype, q.shape[-1])
        if key not in _CHECKED:
            _check_against_math(FUSED_CUDNN, "cuDNN", *key)
            _CHECKED.add(key)
        return FUSED_CUDNN
    return math_part_kernel()


def _check_against_math(kernel: PartKernel, name: str, device: torch.device, dtype: torch.dtype,
                        head_dim: int) -> float:
    """Raise unless ``kernel`` in ``dtype`` gives the math kernel's fp32 output and q/k/v grads, up to ``dtype``'s
    rounding, on a small GQA problem of every rank of a TSP group of 2: a wrong LSE, mask or argument would be
    off by order one. Returns the largest error relative to the largest value."""
    seq_len, tsp_size, worst = 512, 2, 0.0
    gen = torch.Generator(device).manual_seed(0)  # not the global generator: training's draws stay the same
    q, grad_out = (torch.randn(seq_len // tsp_size, 2, 4, head_dim, generator=gen, device=device) for _ in range(2))
    k, v = torch.randn(2, seq_len, 2, 2, head_dim, generator=gen, device=device)
    where = (f"the {name} attention part kernel (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}) "
             f"on {device} in {dtype}, head dim {head_dim}")
    way_out = f"set {PART_KERNEL_ENV}=math to run TSP attention with the exact math kernel, and report this"
    for rank in range(tsp_size):
        positions = (local_positions(seq_len, tsp_size, rank, device), gathered_positions(seq_len, tsp_size, device))
        results = []
        for part_kernel, precision in ((math_part_kernel(), torch.float32), (kernel, dtype)):
            inputs = [t.to(precision).requires_grad_() for t in (q, k, v)]
            try:
                with torch.enable_grad():  # first use may come in a no-grad forward (activation recompute)
                    out = zigzag_causal_attention(*inputs, *positions, head_dim**-0.5, part_kernel=part_kernel)
                    grads = torch.autograd.grad(out, inputs, grad_out.flatten(2).to(precision))
            except RuntimeError as error:  # e.g. a torch or cuDNN build without this kernel
                raise RuntimeError(f"{where} failed ({error}): {way_out}") from error
            results.append([t.float() for t in (out, *grads)])
        for want, got in zip(*results, strict=True):
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    if not worst < 0.05:
        raise RuntimeError(f"{where} disagrees with the exact math kernel (max error {worst:.3g} of the largest "
                           f"value): {way_out}")
    return worst


Plan = list[tuple[slice, list[tuple[slice, bool]]]]


def _chunk_plan(chunk: int, tsp_size: int, tsp_rank: int) -> Plan:
    """Per local query chunk: its rows among the local queries and its (key range, causal) parts, the key
    ranges in chunk-major gathered order (``zigzag.gathered_positions``: natural chunks 2D-1 .. D in blocks
    0 .. D-1, then chunks 0 .. D-1 in blocks D .. 2D-1).

    First chunk p: prefix chunks 0 .. p-1 = blocks [D, D+p), diagonal block D+p. Second chunk 2D-1-p:
    prefix chunks 0 .. 2D-2-p = blocks [p+1, 2D) (all first chunks and the second chunks D .. 2D-2-p, key
    order within an unmasked part does not matter), diagonal block p.
    """
    d, p = tsp_size, tsp_rank
    blocks = ((range(d, d + p), d + p), (range(p + 1, 2 * d), p))
    plan = []
    for local, (prefix, diagonal) in enumerate(blocks):
        # chunk 0 has no prefix (and the part kernels need a non-empty key range)
        parts = [(slice(prefix.start * chunk, prefix.stop * chunk), False)] if len(prefix) else []
        parts.append((slice(diagonal * chunk, (diagonal + 1) * chunk), True))
        plan.append((slice(local * chunk, (local + 1) * chunk), parts))
    return plan


def _merge_into(out: Tensor, lse: Tensor, results: list[tuple[Tensor, Tensor]]) -> None:
    """Write the output and LSE of the same query rows over the union of one or two parts' disjoint key
    ranges into ``out`` and ``lse`` (exact; few kernels, as it runs per chunk and head bucket)."""
    if len(results) == 1:
        out.copy_(results[0][0])
        lse.copy_(results[0][1])
        return
    (out_a, lse_a), (out_b, lse_b) = results
    torch.logaddexp(lse_a, lse_b, out=lse)
    # each part's share of the row's softmax mass, in the accumulation dtype: exp(lse_a - lse) is
    # sigmoid(lse_a - lse_b), and the shares sum to one (six kernels for the merge, not eight)
    weight_a = (lse_a - lse_b).sigmoid_().unsqueeze(-1)
    torch.addcmul(out_b * (1 - weight_a), out_a, weight_a, out=out)


# Position pairs already checked: q positions -> (their k positions, both tensors' versions, (D, p)). TSP
# attention calls the kernel with the same two tensors for every head bucket, forward and backward, so a
# pair is read back (a sync on GPU) once, not 2D times per layer; an in-place change re-checks it.
_CHECKED_LAYOUTS = WeakIdKeyDictionary()


def _zigzag_layout(q_positions: Tensor, k_positions: Tensor) -> tuple[int, int]:
    """(D, p) such that the positions are rank p's local and the chunk-major gathered ones, else ValueError.

    One host read of a (D+1)-element check (a sync on GPU) per pair of position tensors, instead of trusting
    the caller.
    """
    versions = (q_positions._version, k_positions._version)
    known = _CHECKED_LAYOUTS.get(q_positions)
    if known is not None and known[0] is k_positions and known[1] == versions:
        return known[2]
    local_len, seq_len = q_positions.numel(), k_positions.numel()
    if local_len == 0 or local_len % 2 or seq_len % local_len:
        raise ValueError(f"{local_len} local and {seq_len} gathered positions are not a zigzag layout")
    tsp_size = seq_len // local_len
    ranks = zigzag_permutation(seq_len, tsp_size, k_positions.device).view(tsp_size, local_len)  # row p: rank p's
    is_rank = (ranks == q_positions).all(dim=1)
    gathered = gathered_positions(seq_len, tsp_size, k_positions.device)
    gathered_ok, *rank_flags = torch.cat(((k_positions == gathered).all().view(1), is_rank)).tolist()
    if not gathered_ok or rank_flags.count(True) != 1:
        raise ValueError("positions are not TSP's zigzag layout (zigzag.local_positions/gathered_positions); "
                         "use kernels.causal_attention for arbitrary positions")
    layout = tsp_size, rank_flags.index(True)
    _CHECKED_LAYOUTS[q_positions] = (k_positions, versions, layout)
    return layout


def _call_layout(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                 part_kernel: PartKernel | None) -> tuple[Tensor, Tensor, Tensor, Plan, PartKernel]:
    """Checks, then what every call works on: q ``[b, nq, S/D, hd]`` and K/V ``[b, nkv, S, hd]`` heads-first
    (views, no copy); the chunk plan; the part kernel."""
    local_len, _, heads, _ = q.shape
    if heads % k.shape[2] != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({k.shape[2]})")
    tsp_size, tsp_rank = _zigzag_layout(q_positions, k_positions)
    q_heads_first, k_heads_first, v_heads_first = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    kernel = part_kernel or default_part_kernel(q_heads_first)
    return q_heads_first, k_heads_first, v_heads_first, _chunk_plan(local_len // 2, tsp_size, tsp_rank), kernel


def _chunk_rows(t: Tensor, rows: slice, kernel: PartKernel) -> Tensor:
    """A query chunk's rows of a heads-first ``t`` (dim 2), contiguous if ``kernel`` wants them so."""
    chunk = t[:, :, rows]
    return chunk.contiguous() if kernel.contiguous_rows else chunk


@torch.no_grad()  # a plain function by contract: its results are kept for zigzag_attention_backward
def zigzag_attention_forward(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                             softmax_scale: float, *, part_kernel: PartKernel | None = None) -> tuple[Tensor, Tensor]:
    """:func:`zigzag_causal_attention`'s forward without autograd: ``(out [S/D, b, nq*hd], lse [b, nq, S/D])``,
    the LSE being what :func:`zigzag_attention_backward` needs besides q, K, V and out (TSP attention keeps
    out and LSE per head bucket instead of recomputing the attention in backward)."""
    local_shape = q.shape
    q, k, v, plan, kernel = _call_layout(q, k, v, q_positions, k_positions, part_kernel)  # heads-first views
    # written through a heads-first view, so that the [S/D, b, nq*hd] result is a view too (no copy)
    out = torch.empty(local_shape, dtype=q.dtype, device=q.device)
    out_heads_first = out.permute(1, 2, 0, 3)
    lse = torch.empty(q.shape[:-1], dtype=_acc_dtype(q.dtype), device=q.device)
    for rows, parts in plan:
        q_rows = _chunk_rows(q, rows, kernel)
        _merge_into(out_heads_first[:, :, rows], lse[:, :, rows], [
            kernel.forward(q_rows, k[:, :, keys], v[:, :, keys], causal, softmax_scale) for keys, causal in parts])
    return out.flatten(2), lse


def zigzag_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              q_positions: Tensor, k_positions: Tensor, softmax_scale: float, *,
                              part_kernel: PartKernel | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Grads of q ``[S/D, b, nq, hd]`` and of k, v ``[S, b, nkv, hd]`` from ``grad_out`` and
    :func:`zigzag_attention_forward`'s ``out`` (both ``[S/D, b, nq*hd]``) and ``lse``.

    dK and dV are the two halves of one ``[S, b, 2*nkv, hd]`` tensor (``dim=2``), the packed layout TSP
    attention reduce-scatters, so that it needs no concatenating copy (:func:`packed_kv`). The grads are
    written in the inputs' dtype: each part's grad is copied into rows or keys no part has written yet and
    added where one has, and no row or key gets more than two parts' grads (:func:`_chunk_plan`), whose sum
    a 16-bit add rounds once, as an fp32 sum cast back would.
    """
    query_shape, dtype = q.shape, q.dtype
    q, k, v, plan, kernel = _call_layout(q, k, v, q_positions, k_positions, part_kernel)  # heads-first views
    grad_out, out = (t.reshape(query_shape).permute(1, 2, 0, 3) for t in (grad_out, out))  # heads-first too
    grad_q = torch.empty(q.shape, dtype=dtype, device=q.device)
    kv_heads = k.shape[1]
    grad_kv = torch.empty((k.shape[2], k.shape[0], 2 * kv_heads, k.shape[3]), dtype=dtype, device=k.device)
    grad_k, grad_v = (half.permute(1, 2, 0, 3) for half in grad_kv.split(kv_heads, dim=2))  # heads-first
    written_rows, written_keys = _Written(), _Written()
    # the second chunk first: its prefix holds the first chunk's prefix and diagonal, so every part's key
    # range is either unwritten or written whole when it comes
    for rows, parts in reversed(plan):
        grad_out_rows, q_rows, out_rows, lse_rows = (_chunk_rows(t, rows, kernel) for t in (grad_out, q, out, lse))
        for keys, causal in parts:
            part_q, part_k, part_v = kernel.backward(grad_out_rows, q_rows, k[:, :, keys], v[:, :, keys], out_rows,
                                                     lse_rows, causal, softmax_scale)
            written_rows.store(rows, (grad_q, part_q))
            written_keys.store(keys, (grad_k, part_k), (grad_v, part_v))
    for unwritten in written_keys.gaps(0, k.shape[2]):  # keys in every local query's future
        grad_k[:, :, unwritten] = 0
        grad_v[:, :, unwritten] = 0
    return grad_q.permute(2, 0, 1, 3), grad_k.permute(2, 0, 1, 3), grad_v.permute(2, 0, 1, 3)


class _Written:
    """The written ranges of grads' sequence dim (dim 2, heads-first), so that a part's grad is copied into
    fresh positions and added to written ones: no zero fill and no accumulation buffer."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []  # written [start, stop) ranges, host-side bookkeeping

    def gaps(self, start: int, stop: int) -> list[slice]:
        """The unwritten ranges within [start, stop)."""
        found = []
        for span_start, span_stop in sorted(self._spans):
            if span_start > start:
                found.append(slice(start, min(span_start, stop)))
            start = max(start, span_stop)
            if start >= stop:
                break
        if start < stop:
            found.append(slice(start, stop))
        return [gap for gap in found if gap.start < gap.stop]

    def store(self, span: slice, *grads_and_parts: tuple[Tensor, Tensor]) -> None:
        """Write each part into ``grad[:, :, span]``: a copy where nothing was written, else an add (in the
        backward's order a part's range is never written in part)."""
        gaps = self.gaps(span.start, span.stop)
        if gaps not in ([], [span]):
            raise RuntimeError(f"zigzag backward: key range {span} is written in part; the chunk plan changed")
        for grad, part in grads_and_parts:
            if gaps:
                grad[:, :, span] = part
            else:  # add_ on the view: `grad[...] += part` would also copy the sum onto itself
                grad[:, :, span].add_(part)
        self._spans.append((span.start, span.stop))


def packed_kv(k: Tensor, v: Tensor) -> Tensor:
    """``torch.cat((k, v), dim=2)`` for k, v ``[s, b, n, hd]``: without a copy when they are already the two
    halves of one contiguous ``[s, b, 2n, hd]`` tensor (as :func:`zigzag_attention_backward` returns dK/dV)."""
    base = k._base
    if (base is not None and v._base is base and base.is_contiguous()
            and base.shape == (k.shape[0], k.shape[1], 2 * k.shape[2], k.shape[3])
            and k.stride() == v.stride() == base.stride()
            and k.data_ptr() == base.data_ptr() and v.data_ptr() == base[:, :, k.shape[2]:].data_ptr()):
        return base
    return torch.cat((k, v), dim=2)


class _ZigzagAttentionFunction(torch.autograd.Function):
    """:func:`zigzag_causal_attention` with autograd: saves q, K, V, the output and its LSE."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor, scale: float,
                part_kernel: PartKernel | None) -> Tensor:
        out, lse = zigzag_attention_forward(q, k, v, q_positions, k_positions, scale, part_kernel=part_kernel)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, k_positions)
        ctx.scale, ctx.part_kernel = scale, part_kernel
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, q_positions, k_positions = ctx.saved_tensors
        grads = zigzag_attention_backward(grad_out, q, k, v, out, lse, q_positions, k_positions, ctx.scale,
                                          part_kernel=ctx.part_kernel)
        return *grads, None, None, None, None


def zigzag_causal_attention(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                            softmax_scale: float, *, part_kernel: PartKernel | None = None) -> Tensor:
    """Causal attention of a TSP rank's zigzag chunks; :func:`kernels.causal_attention`'s contract for the
    zigzag layout only.

    q ``[S/D, b, nq, hd]`` (rank p's local tokens), k/v ``[S, b, nkv, hd]`` (gathered chunk-major), nq a
    multiple of nkv; q_positions ``zigzag.local_positions(S, D, p)``, k_positions
    ``zigzag.gathered_positions(S, D)`` (checked). Returns ``[S/D, b, nq*hd]``. ``part_kernel``: default
    :func:`default_part_kernel`'s.

    Memory per call, beyond inputs, grads and output, for c = S/(2D), is linear in S: forward, one chunk's
    part outputs (2*b*nq*c*hd, with their LSE-merge weights); backward, one part's q/k/v grads beside the
    grads being written (in the inputs' dtype, dK/dV packed). Saved for backward: q, K/V, the output and its
    LSE. Scratch: per-thread tiles for :data:`FUSED_CPU`, a few score tiles of ``block_elements`` for the
    math kernel. Nothing of size S/D x S, versus the reference's [S/D, S] mask (and its float scores).
    """
    return _ZigzagAttentionFunction.apply(q, k, v, q_positions, k_positions, softmax_scale, part_kernel)
