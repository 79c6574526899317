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

Ring order: rank p sends to p+1 and receives from p-1, so at step s it holds the shard of rank (p-s) mod D.
Backward circulates the weights again, each rank computing its own shard's term first (hiding the first
hop). A grad accumulator for owner o starts at o+1 (step 1), trails the weights by one step so that its
transfer overlaps the next step's compute, and after the last step takes a final hop into o. Weights and
accumulators each take D-1 hops; at most two weight shards and two accumulators are in flight per rank.

Communication per rank per layer, bytes, for W = the weight elements of the whole layer (3*F*h^2 gated,
2*F*h^2 not, plus the fc1 bias; for experts, summed over the rank's local experts), e the weight element
size and e_acc the accumulator's (fp32 for bf16/fp16 weights, else the weight dtype):

- forward:  ring_send W*e*(D-1)/D.
- backward: ring_send W*e*(D-1)/D (weights re-circulated) + W*e_acc*(D-1)/D (accumulators). With
  ``keep_weights`` (``--tsp-keep-weight-shards``) the forward keeps every shard it received (D weight
  buffers, W*e per layer, alive until the layer's backward) and backward sends only the accumulators.

Memory: forward saves only the local input ``x``; backward recomputes each shard's fc1 output (one extra
GEMM per shard) rather than keeping ``[S/D, B, ffn]`` activations (experts: ``[T, ffn_e]``) from all D
shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import ShardLayout, ring_exchange, shard_buffer
from megatron_tsp.grads import weight_grad_for_autograd

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


def _slice_mlp(x: Tensor, weights: Sequence[Tensor], spec: _MLPSpec) -> Tensor:
    """One ffn slice of one MLP: x ``[n, ..., h]`` -> ``[n, ..., h]``; weights = fc1_weight, (fc1_bias), fc2_weight."""
    fc1_weight, fc2_weight = weights[0], weights[-1]
    fc1_bias = weights[1] if spec.has_fc1_bias else None
    hidden = F.linear(x, fc1_weight, fc1_bias)
    if spec.gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = spec.activation(gate) * up
    else:
        hidden = spec.activation(hidden)
    return F.linear(hidden, fc2_weight)


def _shard_mlp(x: Tensor, shard: Sequence[Tensor], spec: _MLPSpec) -> Tensor:
    """One shard's output for this rank's tokens: each MLP's rows of x through that MLP's slice."""
    n = spec.tensors_per_mlp
    if len(spec.tokens_per_mlp) == 1:
        return _slice_mlp(x, shard, spec)
    return torch.cat([_slice_mlp(rows, shard[i * n:(i + 1) * n], spec)
                      for i, rows in enumerate(x.split(spec.tokens_per_mlp))])


def _shard_grads(x: Tensor, shard: Sequence[Tensor], grad_out: Tensor,
                 spec: _MLPSpec) -> tuple[Tensor, list[Tensor]]:
    """(dx, grads of the shard's tensors) from this rank's tokens, recomputing the shard's output."""
    with torch.enable_grad():
        leaf_x = x.detach().requires_grad_()
        leaf_shard = [w.detach().requires_grad_() for w in shard]
        grad_x, *grad_shard = torch.autograd.grad(_shard_mlp(leaf_x, leaf_shard, spec), [leaf_x, *leaf_shard],
                                                  grad_out)
    return grad_x, grad_shard


class TSPMLPFunction(torch.autograd.Function):
    """The TSP MLP ring schedule, forward and backward; see the module docstring for ring order and bytes.

    Inputs: x ``[T, ..., h]`` (this rank's tokens), spec, then the rank's own shard: for each MLP in order
    fc1_weight, (fc1_bias), fc2_weight (Megatron TP shards). Output like x, without fc2 biases. Each shard
    tensor that needs a grad gets it exactly once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: _MLPSpec, *own_shard: Tensor) -> Tensor:
        layout = ShardLayout([t.shape for t in own_shard])
        tsp_size = dist.get_world_size(spec.tsp_group)
        weight_dtype = own_shard[0].dtype
        # Two slots (send from one while receiving into the other), or one per shard when they are kept.
        num_slots = tsp_size if spec.keep_weights else 2
        if tsp_size > 1:
            slots = [shard_buffer(layout.numel, weight_dtype, x.device, "weight") for _ in range(num_slots)]
            layout.pack(own_shard, slots[0])

        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        shard = own_shard
        for ring_step in range(tsp_size):  # holds the shard of rank (p - ring_step) mod D
            if ring_step + 1 < tsp_size:
                next_shard = ring_exchange(slots[ring_step % num_slots], slots[(ring_step + 1) % num_slots],
                                           spec.tsp_group)
            out += _shard_mlp(x, shard, spec)
            if ring_step + 1 < tsp_size:
                shard = layout.unpack(next_shard.wait())

        ctx.spec = spec
        ctx.kept_shards = slots if spec.keep_weights and tsp_size > 1 else None  # slot s: owner (p - s) mod D
        ctx.save_for_backward(x, *own_shard)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _MLPSpec = ctx.spec
        x, *own_shard = ctx.saved_tensors
        layout = ShardLayout([t.shape for t in own_shard])
        tsp_size = dist.get_world_size(spec.tsp_group)
        weight_dtype = own_shard[0].dtype
        acc_dtype = torch.promote_types(weight_dtype, torch.float32)
        kept, ctx.kept_shards = ctx.kept_shards, None  # freed with this frame
        if tsp_size > 1 and kept is None:
            slots = [shard_buffer(layout.numel, weight_dtype, x.device, "weight") for _ in range(2)]
            next_shard = ring_exchange(layout.pack(own_shard, slots[0]), slots[1], spec.tsp_group)

        # Own term first: it overlaps the first weight hop, and the owner's total is completed last.
        grad_x, grad_shard = _shard_grads(x, own_shard, grad_out, spec)
        grad_x = grad_x.to(torch.promote_types(x.dtype, torch.float32))
        own_grads = [g.to(acc_dtype) for g in grad_shard]
        outgoing_acc = None  # accumulator filled at the previous step, on its way to rank p+1
        for ring_step in range(1, tsp_size):  # holds the weights of owner (p - ring_step) mod D
            if kept is not None:
                shard = layout.unpack(kept[ring_step])
            else:
                shard = layout.unpack(next_shard.wait())
                if ring_step + 1 < tsp_size:
                    next_shard = ring_exchange(slots[ring_step % 2], slots[(ring_step + 1) % 2], spec.tsp_group)
            acc = shard_buffer(layout.numel, acc_dtype, x.device, "grad")
            if outgoing_acc is None:  # rank o+1 starts owner o's accumulator
                acc.zero_()
            else:
                incoming_acc = ring_exchange(outgoing_acc, acc, spec.tsp_group)
            grad_x_step, grad_shard = _shard_grads(x, shard, grad_out, spec)
            grad_x += grad_x_step
            if outgoing_acc is not None:
                incoming_acc.wait()
            for acc_part, grad in zip(layout.unpack(acc), grad_shard):
                acc_part += grad
            outgoing_acc = acc
        if tsp_size > 1:  # the last accumulator filled here belongs to rank p+1; ours arrives from p-1
            own_acc = shard_buffer(layout.numel, acc_dtype, x.device, "grad")
            ring_exchange(outgoing_acc, own_acc, spec.tsp_group).wait()
            own_grads = [total + arrived for total, arrived in zip(own_grads, layout.unpack(own_acc))]

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
