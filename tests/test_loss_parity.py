"""TSP inside Megatron's real training loop: 10-iteration loss curves equal the TSP=1 run (fp32, gloo).

The TSP=1 reference runs Megatron's own local layer spec; TSP>1 runs the TSP layers, zigzag data path and
sequence-sharded norms. Pipeline runs are compared with a TSP=1 run at the same pipeline size, because
Megatron seeds each pipeline stage differently (seed + 100 * stage).
"""

from __future__ import annotations

import functools

import pytest

from tests.pretrain_runs import PretrainRun, pretrain

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

ITERS = ("--train-iters", "10")


@functools.cache
def reference(*flags: str) -> PretrainRun:
    run = pretrain(1 if "--pipeline-model-parallel-size" not in flags else 2, *ITERS, *flags)
    assert run.returncode == 0 and len(run.losses) == 10, run.output[-3000:]
    return run


def assert_same_curve(run: PretrainRun, ref: PretrainRun) -> None:
    assert run.returncode == 0, run.output[-4000:]
    assert len(run.losses) == 10, run.output[-4000:]
    assert run.losses == pytest.approx(ref.losses, rel=1e-5)
    assert run.grad_norms == pytest.approx(ref.grad_norms, rel=1e-3)  # printed with 3 decimals
    assert ref.losses[-1] < ref.losses[0] - 0.5  # the model learns: a curve, not a constant


CASES = {  # name: (ranks, flags of the TSP run, flags shared with the TSP=1 reference)
    "tsp2": (2, ("--tsp-size", "2"), ()),
    "tsp4": (4, ("--tsp-size", "4"), ()),
    "tsp2_dp2": (4, ("--tsp-size", "2"), ()),
    "tsp2_dp2_distopt": (4, ("--tsp-size", "2", "--use-distributed-optimizer"), ()),
    "tsp2_gqa": (2, ("--tsp-size", "2"), ("--group-query-attention", "--num-query-groups", "2")),
    "tsp2_recompute_full": (2, ("--tsp-size", "2", "--recompute-granularity", "full",
                                "--recompute-method", "uniform", "--recompute-num-layers", "1"), ()),
    "tsp2_recompute_selective": (2, ("--tsp-size", "2", "--recompute-granularity", "selective"), ()),
    "tsp2_pp2": (4, ("--tsp-size", "2"), ("--pipeline-model-parallel-size", "2")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_curve_matches_tsp1(name: str) -> None:
    ranks, tsp_flags, shared = CASES[name]
    assert_same_curve(pretrain(ranks, *ITERS, *shared, *tsp_flags), reference(*shared))
