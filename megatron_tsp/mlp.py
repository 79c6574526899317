"""TSP MLP: ffn weight shards circulate around a ring, each rank computes its own tokens against all of them.

Rank p of a TSP group of size D holds its tokens ``x [S/D, B, h]`` and the tensor-parallel shard p (ffn
slice p) of the MLP weights, in Megatron's layout (degree D):

- ``linear_fc1.weight`` ``[2*ffn/D, h]`` = [gate rows of slice p ; up rows of slice p] when gated,
  ``[ffn/D, h]`` otherwise; ``linear_fc1.bias`` has the same rows;
- ``linear_fc2.weight`` ``[h, ffn/D]`` (its bias is replicated and added by the caller).

The activation is elementwise over ffn, so summing the D slices' outputs is exact.

Ring order: rank p sends to p+1 and receives from p-1, so at step s it holds the shard of rank (p-s) mod D.
Backward circulates the weights again, each rank computing its own shard's term first (hiding the first
hop). A grad accumulator for owner o starts at o+1 (step 1), trails the weights by one step so that its
transfer overlaps the next step's compute, and after the last step takes a final hop into o. Weights and
accumulators each take D-1 hops; at most two weight shards and two accumulators are in flight per rank.

Communication per rank per layer, bytes, for W = the weight elements of the whole layer (3*F*h^2 gated,
2*F*h^2 not, plus the fc1 bias), e the weight element size and e_acc the accumulator's (fp32 for
bf16/fp16 weights, else the weight dtype):

- forward:  ring_send W*e*(D-1)/D.
- backward: ring_send W*e*(D-1)/D (weights re-circulated, never kept) + W*e_acc*(D-1)/D (accumulators).

Memory: forward saves only the local input ``x``; backward recomputes each shard's fc1 output (one extra
GEMM per shard) rather than keeping ``[S/D, B, ffn]`` activations from all D shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import ShardLayout, ring_exchange, shard_buffer
from megatron_tsp.grads import weight_grad_for_autograd

__all__ = ["TSPMLPFunction", "tsp_mlp"]


@dataclass(frozen=True)
class _MLPSpec:
    tsp_group: dist.ProcessGroup
    activation: Callable[[Tensor], Tensor]
    gated: bool
    has_fc1_bias: bool


def _shard_mlp(x: Tensor, shard: list[Tensor], spec: _MLPSpec) -> Tensor:
    """One ffn slice's output: x ``[sq, b, h]`` -> ``[sq, b, h]``; shard = [fc1_weight, (fc1_bias), fc2_weight]."""
    fc1_weight, fc2_weight = shard[0], shard[-1]
    fc1_bias = shard[1] if spec.has_fc1_bias else None
    hidden = F.linear(x, fc1_weight, fc1_bias)
    if spec.gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = spec.activation(gate) * up
    else:
        hidden = spec.activation(hidden)
    return F.linear(hidden, fc2_weight)


def _shard_grads(x: Tensor, shard: list[Tensor], grad_out: Tensor, spec: _MLPSpec) -> tuple[Tensor, list[Tensor]]:
    """(dx ``[sq, b, h]``, grads of the shard's tensors) from this rank's tokens, recomputing the shard's output."""
    with torch.enable_grad():
        leaf_x = x.detach().requires_grad_()
        leaf_shard = [w.detach().requires_grad_() for w in shard]
        grad_x, *grad_shard = torch.autograd.grad(_shard_mlp(leaf_x, leaf_shard, spec), [leaf_x, *leaf_shard],
                                                  grad_out)
    return grad_x, grad_shard


class TSPMLPFunction(torch.autograd.Function):
    """The TSP MLP ring schedule, forward and backward; see the module docstring for ring order and bytes.

    Inputs: x ``[S/D, B, h]``, fc1_weight, fc1_bias (or None), fc2_weight (Megatron TP shards), spec.
    Output ``[S/D, B, h]`` without the fc2 bias. Each input that needs a grad gets it exactly once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                spec: _MLPSpec) -> Tensor:
        own_shard = [t for t in (fc1_weight, fc1_bias, fc2_weight) if t is not None]
        layout = ShardLayout([t.shape for t in own_shard])
        tsp_size = dist.get_world_size(spec.tsp_group)
        if tsp_size > 1:  # two-slot buffer: send from one slot while receiving into the other
            slots = [shard_buffer(layout.numel, fc1_weight.dtype, x.device, "weight") for _ in range(2)]
            layout.pack(own_shard, slots[0])

        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        shard = own_shard
        for ring_step in range(tsp_size):  # holds the shard of rank (p - ring_step) mod D
            if ring_step + 1 < tsp_size:
                next_shard = ring_exchange(slots[ring_step % 2], slots[(ring_step + 1) % 2], spec.tsp_group)
            out += _shard_mlp(x, shard, spec)
            if ring_step + 1 < tsp_size:
                shard = layout.unpack(next_shard.wait())

        ctx.spec = spec
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _MLPSpec = ctx.spec
        x, fc1_weight, fc1_bias, fc2_weight = ctx.saved_tensors
        own_shard = [t for t in (fc1_weight, fc1_bias, fc2_weight) if t is not None]
        layout = ShardLayout([t.shape for t in own_shard])
        tsp_size = dist.get_world_size(spec.tsp_group)
        acc_dtype = torch.promote_types(fc1_weight.dtype, torch.float32)
        if tsp_size > 1:
            slots = [shard_buffer(layout.numel, fc1_weight.dtype, x.device, "weight") for _ in range(2)]
            next_shard = ring_exchange(layout.pack(own_shard, slots[0]), slots[1], spec.tsp_group)

        # Own term first: it overlaps the first weight hop, and the owner's total is completed last.
        grad_x, grad_shard = _shard_grads(x, own_shard, grad_out, spec)
        grad_x = grad_x.to(torch.promote_types(x.dtype, torch.float32))
        own_grads = [g.to(acc_dtype) for g in grad_shard]
        outgoing_acc = None  # accumulator filled at the previous step, on its way to rank p+1
        for ring_step in range(1, tsp_size):  # holds the weights of owner (p - ring_step) mod D
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

        grad_weights = [weight_grad_for_autograd(param, grad) for param, grad in zip(own_shard, own_grads)]
        grad_fc1_weight, grad_fc2_weight = grad_weights[0], grad_weights[-1]
        grad_fc1_bias = grad_weights[1] if spec.has_fc1_bias else None
        return grad_x.to(x.dtype), grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, None


def tsp_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
            tsp_group: dist.ProcessGroup, *, activation: Callable[[Tensor], Tensor] = F.silu,
            gated: bool = True) -> Tensor:
    """TSP MLP of rank p's tokens: x ``[S/D, B, h]`` -> ``[S/D, B, h]`` (fc2 bias not added).

    ``activation`` is elementwise; with ``gated`` the output is fc2(activation(gate) * up) (SwiGLU with
    ``F.silu``, GeGLU with ``F.gelu``), else fc2(activation(fc1(x))).
    """
    ffn_rows = fc2_weight.shape[1] * (2 if gated else 1)
    if fc1_weight.shape != (ffn_rows, x.shape[-1]) or fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shards {tuple(fc1_weight.shape)}, {tuple(fc2_weight.shape)} do not match "
                         f"Megatron's TP layout [{ffn_rows}, {x.shape[-1]}], [{x.shape[-1]}, ffn/D]"
                         f"{' (gated: fc1 = [gate ; up])' if gated else ''}")
    spec = _MLPSpec(tsp_group=tsp_group, activation=activation, gated=gated, has_fc1_bias=fc1_bias is not None)
    return TSPMLPFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, spec)
