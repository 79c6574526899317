"""The comm module on gloo: results of every op, group-local owners in subgroups, byte counts, residency."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from megatron_tsp.comm import (
    ShardLayout,
    all_gather_seq,
    all_gather_zigzag,
    broadcast,
    broadcast_parts,
    comm_bytes,
    reduce,
    reduce_parts,
    reduce_scatter_seq,
    reduce_scatter_zigzag,
    ring_exchange,
    shard_buffer,
    track_shard_residency,
)
from megatron_tsp.zigzag import gathered_positions, local_positions
from tests.multiprocess import run_on_ranks


def _check_ops(group: dist.ProcessGroup) -> None:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    global_rank = dist.get_rank()
    share = Fraction(size - 1, size)
    with comm_bytes() as counter:
        for owner in range(size):  # group-local owner: in a subgroup it differs from the global rank
            value = torch.full((3, 2), float(global_rank)) if rank == owner else torch.zeros(3, 2)
            assert torch.equal(broadcast(value, owner, group).wait(),
                               torch.full((3, 2), float(dist.get_global_rank(group, owner))))

        local = torch.arange(4.0).view(2, 2) + 10 * rank  # [n=2, 2]
        gathered = all_gather_seq(local, group).wait()
        assert torch.equal(gathered, torch.cat([torch.arange(4.0).view(2, 2) + 10 * r for r in range(size)]))

        # every rank's zigzag tokens (chunks of 2), gathered chunk-major, and the transpose summing them back
        seq_len, total = 4 * size, sum(r + 1 for r in range(size))
        mine = local_positions(seq_len, size, rank).double().view(4, 1, 1)  # [2c, 1, 1]: each token's position
        gathered = all_gather_zigzag(mine, group).wait()
        assert torch.equal(gathered.flatten(), gathered_positions(seq_len, size).double())
        scattered = reduce_scatter_zigzag(gathered * (rank + 1), group).wait()
        assert torch.equal(scattered, mine * total)

        for owner in range(size):
            summed = reduce(torch.full((5,), float(rank + 1)), owner, group).wait()
            if rank == owner:
                assert torch.equal(summed, torch.full((5,), float(total)))

        # parts of one buffer from / into their owners: every rank one, or the last rank the only one (a
        # broadcast and a reduce per part)
        for owners in (list(range(size)), [size - 1]):
            flat = torch.zeros(len(owners), 3)
            if rank in owners:
                flat[owners.index(rank)] = float(global_rank)
            expected = torch.tensor([[float(dist.get_global_rank(group, o))] * 3 for o in owners])
            assert torch.equal(broadcast_parts(flat.view(-1), owners, group).wait().view(-1, 3), expected)
            own = reduce_parts(torch.full((2 * len(owners),), float(rank + 1)), owners, group).wait()
            if rank in owners:
                assert torch.equal(own, torch.full((2,), float(total)))
        scattered = reduce_scatter_seq(torch.arange(2.0 * size) + rank, group).wait()
        assert torch.equal(scattered, size * (torch.arange(2.0) + 2 * rank) + sum(range(size)))

        received = ring_exchange(torch.full((7,), float(rank)), torch.empty(7), group).wait()
        assert torch.equal(received, torch.full((7,), float((rank - 1) % size)))

    f32, f64 = 4, 8
    assert dict(counter.bytes_by_op) == {
        "broadcast": size * share * 6 * f32 + (size + 1) * share * 3 * f32,
        "all_gather": share * 2 * size * 2 * f32 + share * size * 4 * f64,
        "reduce_scatter": share * 4 * size * f64 + share * 2 * size * f32,
        "reduce": size * share * 5 * f32 + (size + 1) * share * 2 * f32,
        "ring_send": Fraction(7 * f32),
    }
    # one message per collective call (the zigzag gathers and scatters are two), one per send
    assert dict(counter.messages_by_op) == {"broadcast": 2 * size + 1, "all_gather": 3, "reduce_scatter": 3,
                                            "reduce": 2 * size + 1, "ring_send": 1}


def _ops_on_world_and_subgroups(rank: int, world_size: int) -> None:
    _check_ops(dist.group.WORLD)
    # strided subgroups {0, 2} and {1, 3}: group-local rank 1 is global rank 2 or 3
    subgroups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    _check_ops(subgroups[rank % 2])


@pytest.mark.multiprocess
def test_ops_world_and_subgroups() -> None:
    run_on_ranks(_ops_on_world_and_subgroups, 4)


def test_shard_layout_round_trip_and_cast() -> None:
    tensors = [torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(3, dtype=torch.bfloat16), torch.randn(4, 3)]
    layout = ShardLayout([t.shape for t in tensors])
    flat = layout.pack(tensors, torch.empty(layout.numel, dtype=torch.float32))
    assert layout.numel == 12 + 3 + 12
    for part, tensor in zip(layout.unpack(flat), tensors):
        assert part.shape == tensor.shape and torch.equal(part, tensor.float())


def test_residency_counts_live_buffers_and_views() -> None:
    with track_shard_residency() as residency:
        first = shard_buffer(8, torch.float32, torch.device("cpu"), "weight")
        view = first[:4].view(2, 2)  # a view keeps its buffer alive
        del first
        second = shard_buffer(8, torch.float32, torch.device("cpu"), "weight")
        assert residency.live["weight"] == 2
        del view, second
        assert residency.live["weight"] == 0
        shard_buffer(8, torch.float32, torch.device("cpu"), "grad")
    assert residency.peak == {"weight": 2, "grad": 1}
