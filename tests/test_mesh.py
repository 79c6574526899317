"""The tsp axis in the rank mesh: every rank's tsp/pp/dp/ep peers against independently computed lists."""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

import megatron_tsp
from megatron_tsp.mesh import megatron_order
from tests.multiprocess import run_on_ranks


def _peers(rank: int, world: int, tsp: int, pp: int, ep: int) -> dict:
    megatron_tsp.initialize_model_parallel(tsp_size=tsp, pipeline_model_parallel_size=pp,
                                           expert_model_parallel_size=ep)
    collection = ProcessGroupCollection.use_mpu_process_groups()
    assert collection.tsp is collection.tp is megatron_tsp.get_tsp_group()
    result = {
        "tsp": megatron_tsp.get_tsp_global_ranks(),
        "tsp_size": megatron_tsp.get_tsp_world_size(),
        "tsp_rank": megatron_tsp.get_tsp_rank(),
        "pp": dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()),
        "dp": dist.get_process_group_ranks(parallel_state.get_data_parallel_group()),
        "ep": dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()),
    }
    parallel_state.destroy_model_parallel()
    return result


def _expected(rank: int, world: int, tsp: int, pp: int, ep: int) -> dict:
    """Order tsp-cp-ep-dp-pp with cp = 1: rank = t + tsp * (d + dp * p); experts use etp-ep-edp-pp."""
    dp = world // (tsp * pp)
    t, d, p = rank % tsp, (rank // tsp) % dp, rank // (tsp * dp)
    coords = lambda t_, d_, p_: t_ + tsp * (d_ + dp * p_)  # noqa: E731
    # Expert view of the same ranks (expert-tensor-parallel 1): within a pipeline stage the ep index varies
    # fastest, then the expert-data-parallel index.
    stage_rank = rank - p * tsp * dp
    e = stage_rank % ep
    return {
        "tsp": [coords(i, d, p) for i in range(tsp)],
        "tsp_size": tsp,
        "tsp_rank": t,
        "pp": [coords(t, d, i) for i in range(pp)],
        "dp": [coords(t, i, p) for i in range(dp)],
        "ep": [p * tsp * dp + (stage_rank - e) + i for i in range(ep)],
    }


LAYOUTS = [  # world, tsp, pp, ep
    (4, 2, 1, 1),  # tsp2 x dp2
    (4, 2, 2, 1),  # tsp2 x pp2
    (8, 4, 1, 1),  # tsp4 x dp2
    (8, 2, 2, 1),  # tsp2 x pp2 x dp2
    (4, 2, 1, 2),  # tsp2 with ep2 (dp2)
]


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,tsp,pp,ep", LAYOUTS)
def test_group_layout(world: int, tsp: int, pp: int, ep: int) -> None:
    got = run_on_ranks(_peers, world, tsp, pp, ep)
    for rank in range(world):
        assert got[rank] == _expected(rank, world, tsp, pp, ep), f"rank {rank}"
    # The tsp groups partition the world, each of size tsp.
    tsp_groups = {tuple(g["tsp"]) for g in got}
    assert sorted(itertools.chain(*tsp_groups)) == list(range(world))


def test_order_string() -> None:
    assert megatron_order("tsp-cp-ep-dp-pp") == "tp-cp-ep-dp-pp"
    assert megatron_order("tsp-cp-ep-pp-dp") == "tp-cp-ep-pp-dp"
    with pytest.raises(ValueError, match="--tsp-order"):
        megatron_order("tp-cp-ep-dp-pp")
