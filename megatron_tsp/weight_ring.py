"""The weight ring: every rank's weight shard visits every rank, and backward brings each shard its grads.

Shared by the schedules whose work splits over weight shards while tokens stay put: the MLP and expert
rings (``mlp.py``) and the vocabulary-parallel output layer and loss (``output.py``). Each rank holds its
own shard (a list of tensors, packed into one message) and its own tokens.

Order: rank p sends to p+1 and receives from p-1, so at ring step s it holds the shard of owner
(p - s) mod D, its own at step 0.

Forward (:func:`visit_shards`): D steps; the next shard's hop is in flight while the caller's ``visit``
computes on the current one (double buffering: two weight slots, or D slots when the shards are kept for
backward).

Backward (:func:`gather_shard_grads`): the weights circulate again (unless kept). A grad accumulator for
owner o starts at o+1 (step 1), trails the weights by one step so that its transfer overlaps the next
step's compute, and after the last step takes a final hop into o, during which o computes its own shard's
term and then adds it (hiding that hop; the first weight hop is the exposed one). Weights and accumulators
each take D-1 hops; at most two weight shards and two accumulators are alive per rank.

Bytes per rank, for W the elements of a rank's shard, e its element size and e_acc the accumulator's (fp32
for 16-bit weights, else the weight dtype): forward ring_send W*e*(D-1); backward W*e*(D-1) (weights,
unless kept) + W*e_acc*(D-1) (accumulators).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_tsp.comm import ShardLayout, group_rank, group_size, ring_exchange, shard_buffer

__all__ = ["gather_shard_grads", "visit_shards"]

Visit = Callable[[list[Tensor], int], None]
ShardGrads = Callable[[list[Tensor], int], list[Tensor]]


def visit_shards(own_shard: Sequence[Tensor], group: dist.ProcessGroup, visit: Visit,
                 keep: bool = False) -> list[Tensor] | None:
    """Call ``visit(shard, owner)`` with every rank's shard (same shapes and dtypes as ``own_shard``), own
    first. With ``keep`` returns the D received buffers (buffer s holds owner (p - s) mod D) for
    :func:`gather_shard_grads`; else None.
    """
    size, rank = group_size(group), group_rank(group)
    layout = ShardLayout([t.shape for t in own_shard])
    num_slots = size if keep else 2  # send from one slot while receiving into the other, or keep them all
    if size > 1:
        slots = [shard_buffer(layout.numel, own_shard[0].dtype, own_shard[0].device, "weight")
                 for _ in range(num_slots)]
        layout.pack(own_shard, slots[0])
    shard = list(own_shard)
    for ring_step in range(size):
        if ring_step + 1 < size:
            next_shard = ring_exchange(slots[ring_step % num_slots], slots[(ring_step + 1) % num_slots], group)
        visit(shard, (rank - ring_step) % size)
        if ring_step + 1 < size:
            shard = layout.unpack(next_shard.wait())
    return slots if keep and size > 1 else None


def gather_shard_grads(own_shard: Sequence[Tensor], group: dist.ProcessGroup, shard_grads: ShardGrads,
                       kept: list[Tensor] | None = None) -> list[Tensor]:
    """Call ``shard_grads(shard, owner)`` with every rank's shard (the others' in :func:`visit_shards`'s
    order, then its own); it returns this rank's grads of that shard's tensors (and accumulates anything
    else it needs, such as input grads, itself). Returns the own shard's grads summed over the group, in
    fp32 for 16-bit weights. ``kept``: :func:`visit_shards`'s buffers, so that no weights move again.
    """
    size, rank = group_size(group), group_rank(group)
    layout = ShardLayout([t.shape for t in own_shard])
    dtype, device = own_shard[0].dtype, own_shard[0].device
    acc_dtype = torch.promote_types(dtype, torch.float32)
    if size == 1:
        return [g.to(acc_dtype) for g in shard_grads(list(own_shard), rank)]
    if kept is None:
        slots = [shard_buffer(layout.numel, dtype, device, "weight") for _ in range(2)]
        next_shard = ring_exchange(layout.pack(own_shard, slots[0]), slots[1], group)

    outgoing_acc = None  # accumulator filled at the previous step, on its way to rank p+1
    for ring_step in range(1, size):  # holds the weights of owner (p - ring_step) mod D
        if kept is not None:
            shard = layout.unpack(kept[ring_step])
        else:
            shard = layout.unpack(next_shard.wait())
            if ring_step + 1 < size:
                next_shard = ring_exchange(slots[ring_step % 2], slots[(ring_step + 1) % 2], group)
        acc = shard_buffer(layout.numel, acc_dtype, device, "grad")
        if outgoing_acc is None:  # rank o+1 starts owner o's accumulator
            acc.zero_()
        else:
            incoming_acc = ring_exchange(outgoing_acc, acc, group)
        grads = shard_grads(shard, (rank - ring_step) % size)
        if outgoing_acc is not None:
            incoming_acc.wait()
        for acc_part, grad in zip(layout.unpack(acc), grads):
            acc_part += grad
        del grads  # not held while the next shard's grads are computed
        outgoing_acc = acc
    # The last accumulator filled here belongs to rank p+1; ours arrives from p-1 while our own term computes
    # (last, so that no third accumulator-sized buffer holds it through the ring).
    own_acc = shard_buffer(layout.numel, acc_dtype, device, "grad")
    arriving = ring_exchange(outgoing_acc, own_acc, group)
    own_grads = shard_grads(list(own_shard), rank)
    arriving.wait()
    totals = layout.unpack(own_acc)
    for total, grad in zip(totals, own_grads):
        total += grad
    return totals
