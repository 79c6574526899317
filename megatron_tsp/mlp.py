"""TSP MLP: ffn weight shards circulate around a ring, each rank computes its own tokens against all of them.

Rank p of a TSP group of size D holds its tokens ``x [S/D, B, h]`` and the tensor-parallel shard p (ffn
slice p) of the MLP weights, in Megatron's layout (degree D):

- ``linear_fc1.weight`` ``[2*ffn/D, h]`` = [gate rows of slice p ; up rows of slice p] when gated,
  ``[ffn/D, h]`` otherwise; ``linear_fc1.bias`` has the same rows;
- ``linear_fc2.weight`` ``[h, ffn/D]`` (its bias is replicated and added by the caller).

The activation is elementwise over ffn, so summing the D slices' outputs is exact.

Experts (``--tsp-expert-ring``): the same ring serves a rank's local MoE experts, each sharded over the TSP
axis in Megatron's expert-tensor-parallel layout of degree D. One message carries the slices of all local
experts; each rank runs its own dispatched tokens (sorted by expert, ``tokens_per_expert`` of them per
expert) through every slice, so tokens never leave their rank for the experts' sake. A rank with no tokens
for an expert still forwards that expert's weights and accumulators.

The shards circulate by ``weight_ring.py`` (ring order, double buffering, grad accumulators that travel
with the shards and arrive at their owner holding the sum over all ranks).

Communication per rank per layer, bytes, for W = the weight elements of the whole layer (3*F*h^2 gated,
2*F*h^2 not, plus the fc1 bias; for experts, summed over the rank's local experts), e the weight element
size and e_acc the accumulator's (fp32 for bf16/fp16 weights, else the weight dtype):

- forward:  ring_send W*e*(D-1)/D.
- backward: ring_send W*e*(D-1)/D (weights re-circulated) + W*e_acc*(D-1)/D (accumulators). With
  ``keep_weights`` (``--tsp-keep-weight-shards``) the forward keeps every shard it received (D weight
  buffers, W*e per layer, alive until the layer's backward) and backward sends only the accumulators.

Memory: forward saves only the local input ``x``; backward recomputes each shard's fc1 output and
activation (one extra GEMM per shard; fc2 is differentiated by hand, without its output) rather than keeping
``[S/D, B, ffn]`` activations (experts: ``[T, ffn_e]``) from all D shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.grads import weight_grad_for_autograd
from megatron_tsp.weight_ring import gather_shard_grads, visit_shards

__all__ = ["TSPMLPFunction", "tsp_expert_mlps", "tsp_mlp"]


@dataclass(frozen=True)
class _MLPSpec:
    tsp_group: dist.ProcessGroup
    activation: Callable[[Tensor], Tensor]
    gated: bool
    has_fc1_bias: bool
    tokens_per_mlp: tuple[int, ...]  # rows of x (dim 0) for each MLP of the shard, in order
    keep_weights: bool = False  # keep every shard the forward received for backward (no second circulation)

    @property
    def tensors_per_mlp(self) -> int:
        return 3 if self.has_fc1_bias else 2


def _per_mlp(shard: Sequence[Tensor], spec: _MLPSpec) -> list[Sequence[Tensor]]:
    """A shard's tensors grouped by MLP: [fc1_weight, (fc1_bias), fc2_weight] for each, in order."""
    n = spec.tensors_per_mlp
    return [shard[i * n:(i + 1) * n] for i in range(len(spec.tokens_per_mlp))]


def _slice_hidden(x: Tensor, weights: Sequence[Tensor], spec: _MLPSpec) -> Tensor:
    """fc1 and the activation of one ffn slice of one MLP: x ``[n, ..., h]`` -> ``[n, ..., ffn/D]``; weights =
    fc1_weight, (fc1_bias), then anything (fc2_weight, unused here)."""
    hidden = F.linear(x, weights[0], weights[1] if spec.has_fc1_bias else None)
    if spec.gated:
        gate, up = hidden.chunk(2, dim=-1)
        return spec.activation(gate) * up
    return spec.activation(hidden)


def _shard_mlp(x: Tensor, shard: Sequence[Tensor], spec: _MLPSpec) -> Tensor:
    """One shard's output for this rank's tokens: each MLP's rows of x through that MLP's slice."""
    mlps = _per_mlp(shard, spec)
    if len(mlps) == 1:  # the dense MLP: no split and no concatenating copy
        return F.linear(_slice_hidden(x, mlps[0], spec), mlps[0][-1])
    return torch.cat([F.linear(_slice_hidden(rows, mlp, spec), mlp[-1])
                      for rows, mlp in zip(x.split(spec.tokens_per_mlp), mlps)])


def _shard_grads(x: Tensor, shard: Sequence[Tensor], grad_out: Tensor,
                 spec: _MLPSpec) -> tuple[Tensor, list[Tensor]]:
    """(dx, grads of the shard's tensors) from this rank's tokens. Each slice's activation is recomputed;
    fc2 is differentiated by hand (its output is not needed): d hidden = d out @ fc2, d fc2 = d out^T @ hidden.
    """
    mlps = _per_mlp(shard, spec)
    with torch.enable_grad():
        leaf_x = x.detach().requires_grad_()
        leaf_fc1 = [[w.detach().requires_grad_() for w in mlp[:-1]] for mlp in mlps]  # fc1 weight, (bias)
        hiddens = [_slice_hidden(rows, fc1, spec) for rows, fc1 in zip(leaf_x.split(spec.tokens_per_mlp), leaf_fc1)]
    grad_rows = grad_out.split(spec.tokens_per_mlp)
    grad_fc2 = [g.flatten(0, -2).t() @ hidden.flatten(0, -2) for g, hidden in zip(grad_rows, hiddens)]
    grad_x, *grad_fc1 = torch.autograd.grad(hiddens, [leaf_x, *(w for fc1 in leaf_fc1 for w in fc1)],
                                            [g @ mlp[-1] for g, mlp in zip(grad_rows, mlps)])
    m = spec.tensors_per_mlp - 1  # fc1 tensors per MLP
    return grad_x, [g for i, fc2 in enumerate(grad_fc2) for g in (*grad_fc1[i * m:(i + 1) * m], fc2)]


class TSPMLPFunction(torch.autograd.Function):
    """The TSP MLP ring schedule, forward and backward; see the module docstring for ring order and bytes.

    Inputs: x ``[T, ..., h]`` (this rank's tokens), spec, then the rank's own shard: for each MLP in order
    fc1_weight, (fc1_bias), fc2_weight (Megatron TP shards). Output like x, without fc2 biases. Each shard
    tensor that needs a grad gets it exactly once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: _MLPSpec, *own_shard: Tensor) -> Tensor:
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)

        def add_shard_output(shard: list[Tensor], owner: int) -> None:
            out.add_(_shard_mlp(x, shard, spec))

        ctx.kept_shards = visit_shards(own_shard, spec.tsp_group, add_shard_output, keep=spec.keep_weights)
        ctx.spec = spec
        ctx.save_for_backward(x, *own_shard)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _MLPSpec = ctx.spec
        x, *own_shard = ctx.saved_tensors
        kept, ctx.kept_shards = ctx.kept_shards, None  # freed with this frame
        grad_x = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)

        def shard_grads(shard: list[Tensor], owner: int) -> list[Tensor]:
            grad_x_shard, grads = _shard_grads(x, shard, grad_out, spec)
            grad_x.add_(grad_x_shard)
            return grads

        own_grads = gather_shard_grads(own_shard, spec.tsp_group, shard_grads, kept)
        grad_shard = [weight_grad_for_autograd(param, grad) for param, grad in zip(own_shard, own_grads)]
        return grad_x.to(x.dtype), None, *grad_shard


def _check_layout(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, gated: bool) -> None:
    ffn_rows = fc2_weight.shape[1] * (2 if gated else 1)
    if fc1_weight.shape != (ffn_rows, x.shape[-1]) or fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shards {tuple(fc1_weight.shape)}, {tuple(fc2_weight.shape)} do not match "
                         f"Megatron's TP layout [{ffn_rows}, {x.shape[-1]}], [{x.shape[-1]}, ffn/D]"
                         f"{' (gated: fc1 = [gate ; up])' if gated else ''}")


def tsp_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
            tsp_group: dist.ProcessGroup, *, activation: Callable[[Tensor], Tensor] = F.silu,
            gated: bool = True, keep_weights: bool = False) -> Tensor:
    """TSP MLP of rank p's tokens: x ``[S/D, B, h]`` -> ``[S/D, B, h]`` (fc2 bias not added).

    ``activation`` is elementwise; with ``gated`` the output is fc2(activation(gate) * up) (SwiGLU with
    ``F.silu``, GeGLU with ``F.gelu``), else fc2(activation(fc1(x))). ``keep_weights``: keep the D shards
    from forward to backward (D weight buffers instead of two) so that backward circulates only accumulators.
    """
    _check_layout(x, fc1_weight, fc2_weight, gated)
    spec = _MLPSpec(tsp_group=tsp_group, activation=activation, gated=gated, has_fc1_bias=fc1_bias is not None,
                    tokens_per_mlp=(x.shape[0],), keep_weights=keep_weights)
    return TSPMLPFunction.apply(x, spec, *(t for t in (fc1_weight, fc1_bias, fc2_weight) if t is not None))


def tsp_expert_mlps(x: Tensor, tokens_per_expert: Sequence[int],
                    experts: Sequence[tuple[Tensor, Tensor | None, Tensor]], tsp_group: dist.ProcessGroup, *,
                    activation: Callable[[Tensor], Tensor] = F.silu, gated: bool = True,
                    keep_weights: bool = False) -> Tensor:
    """A rank's local experts by the TSP ring: x ``[T, h]`` (its dispatched tokens, sorted by expert) ->
    ``[T, h]`` (fc2 biases not added).

    ``experts`` holds each local expert's (fc1_weight, fc1_bias or None, fc2_weight) shard of degree D;
    ``tokens_per_expert`` the rows of x for each (sums to T; may differ between ranks, zeros included).
    Every rank of ``tsp_group`` must call this with the same experts, in the same order. ``keep_weights``
    as in :func:`tsp_mlp`.
    """
    if len(tokens_per_expert) != len(experts) or sum(tokens_per_expert) != x.shape[0]:
        raise ValueError(f"tokens_per_expert {list(tokens_per_expert)} does not split {x.shape[0]} tokens "
                         f"over {len(experts)} experts")
    has_fc1_bias = experts[0][1] is not None
    for fc1_weight, fc1_bias, fc2_weight in experts:
        _check_layout(x, fc1_weight, fc2_weight, gated)
        if (fc1_bias is not None) != has_fc1_bias:
            raise ValueError("either every expert has an fc1 bias or none has")
    spec = _MLPSpec(tsp_group=tsp_group, activation=activation, gated=gated, has_fc1_bias=has_fc1_bias,
                    tokens_per_mlp=tuple(int(n) for n in tokens_per_expert), keep_weights=keep_weights)
    shard = [t for expert in experts for t in expert if t is not None]
    return TSPMLPFunction.apply(x, spec, *shard)
