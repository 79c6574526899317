"""Checkpoints across layouts with Megatron's torch_dist format: a TSP=D checkpoint is a TP=D checkpoint.

Every run trains the tiny GPT for the 10 iterations of test_loss_parity (the lr schedule depends on
--train-iters); checkpoints are taken after iteration 5, by test_loss_parity's TSP=2 and TSP=4 runs
themselves or by a saving run that stops there (--exit-interval 5); a loading run continues from iteration 5
(--ckpt-step 5) with iterations 6-10. TSP at any degree, plain TP=2 and TSP=1 train identically (test_loss_parity), so a reload
at any of them must continue like the uninterrupted TSP=1 run, which is test_loss_parity's reference run
(shared, not rerun). Resuming at the saving layout with its RNG state is checked bit for bit at TSP=2.

The distributed optimizer's state (Adam moments and step, fp32 main params) reshards too: in Megatron's
default format along data parallelism (TSP=2 x DP=2 -> DP=1), in its fully reshardable format across TSP and
DP (TSP=1 x DP=2 -> TSP=4 x DP=1). With torch's Adam (no Apex/TE) both need megatron_compat.patches; without
them the load fails, or the resumed curve drifts from iteration 7 on (a wrong Adam step).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.pretrain_runs import MOE, PRINTED_NORM_TOLERANCE, TINY_CONFIG, PretrainRun, pretrain
from tests.test_loss_parity import (
    CHECKPOINTS,
    EXPERT_RING,
    ITERS,
    SAVED_AT,
    SAVING_RUNS,
    SHARED_EXPERT,
    reference,
    tsp_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

LAYOUTS = {  # name: (ranks, flags)
    "tsp1": (1, ("--tsp-size", "1")),
    "tsp2": (2, ("--tsp-size", "2")),
    "tsp4": (4, ("--tsp-size", "4")),
    "tp2": (2, ("--tensor-model-parallel-size", "2")),
    "tsp2_distopt": (2, ("--tsp-size", "2", "--use-distributed-optimizer")),
    "tsp4_distopt": (4, ("--tsp-size", "4", "--use-distributed-optimizer")),
    "tsp1_dp2_distopt_fully_reshardable": (2, ("--tsp-size", "1", "--use-distributed-optimizer",
                                               "--dist-ckpt-optim-fully-reshardable")),
    # MoE at expert-parallel size 2 (expert initial weights depend on it): experts sharded over TSP=2 by the
    # expert ring (expert-tensor-parallel 2) and whole experts at TSP=1.
    "moe_tsp2_ep2_expert_ring": (4, (*EXPERT_RING, *MOE, *SHARED_EXPERT)),
    "moe_tsp1_ep2": (2, ("--tsp-size", "1", *MOE, *SHARED_EXPERT)),
}


def ok(run: PretrainRun, iterations: int) -> PretrainRun:
    assert run.returncode == 0 and len(run.losses) == iterations, run.output[-4000:]
    return run


@functools.cache
def saved(layout: str) -> Path:
    """A checkpoint after iteration 5, written at ``layout``."""
    path = CHECKPOINTS / layout
    if layout in SAVING_RUNS:  # test_loss_parity's run of this layout saved it
        ok(tsp_run(layout), 10)
        return path
    ranks, flags = LAYOUTS[layout]
    ok(pretrain(ranks, *ITERS, *flags, "--exit-interval", str(SAVED_AT), "--save", str(path),
                "--save-interval", "100"), SAVED_AT)
    return path


def resumed(checkpoint: Path, layout: str, *extra: str) -> PretrainRun:
    """Iterations 6-10 at ``layout`` from ``checkpoint``."""
    ranks, flags = LAYOUTS[layout]
    return ok(pretrain(ranks, *ITERS, *flags, "--load", str(checkpoint), "--ckpt-step", str(SAVED_AT), *extra),
              10 - SAVED_AT)


def assert_continues(run: PretrainRun, uninterrupted: PretrainRun) -> None:
    # rel=1e-5 as in test_loss_parity: layouts differ only in float summation order.
    assert run.losses == pytest.approx(uninterrupted.losses[SAVED_AT:], rel=1e-5)
    assert run.grad_norms == pytest.approx(uninterrupted.grad_norms[SAVED_AT:], abs=PRINTED_NORM_TOLERANCE)
    # the main params (and, in the distributed optimizer, their fp32 copies) came back too
    assert run.params_norms == pytest.approx(uninterrupted.params_norms[SAVED_AT:], abs=PRINTED_NORM_TOLERANCE)


@pytest.mark.parametrize("layout", ["tsp2", "tsp1", "tp2"])
def test_tsp4_checkpoint_continues_at(layout: str) -> None:
    # RNG states are per tensor-parallel rank, so they are not loaded across layouts.
    assert_continues(resumed(saved("tsp4"), layout, "--no-load-rng"), reference(1, TINY_CONFIG))


def test_plain_tp2_checkpoint_continues_at_tsp4() -> None:
    # The reverse direction; a TSP=2 checkpoint has the same sharded keys as this TP=2 one.
    assert_continues(resumed(saved("tp2"), "tsp4", "--no-load-rng"), reference(1, TINY_CONFIG))


def test_resume_at_the_same_layout_is_bit_identical() -> None:
    run, uninterrupted = resumed(saved("tsp2"), "tsp2"), tsp_run("tsp2")
    # Identical at the printed precision (rel=1e-12 only absorbs the float arithmetic of pretrain_runs),
    # except the resumed run's second loss: Megatron prints the mean of a run's first two iterations (7
    # significant digits), and undoing that (pretrain_runs._parse) can be off by 3 half-units of the print.
    expected = uninterrupted.losses[SAVED_AT:]
    assert run.losses[1] == pytest.approx(expected[1], abs=1.5e-6)
    assert run.losses[:1] + run.losses[2:] == pytest.approx(expected[:1] + expected[2:], rel=1e-12)
    assert run.grad_norms == uninterrupted.grad_norms[SAVED_AT:]


def test_distributed_optimizer_state_reshards_along_data_parallelism() -> None:
    # Saved by test_loss_parity's TSP=2 x DP=2 run (Megatron's output layer, whose weights are the ones the
    # vocabulary ring of this run uses), in Megatron's default format; one rank now holds both DP shards.
    run = resumed(saved("tsp2_dp2_distopt_overlap_megatron_output"), "tsp2_distopt", "--no-load-rng")
    assert_continues(run, reference(1, TINY_CONFIG))


def test_distributed_optimizer_state_reshards_across_tsp_degrees() -> None:
    run = resumed(saved("tsp1_dp2_distopt_fully_reshardable"), "tsp4_distopt", "--no-load-rng")
    assert_continues(run, reference(1, TINY_CONFIG))


def test_moe_checkpoint_moves_between_tsp_layouts() -> None:
    # Dense weights from TSP=2 to 1 and every expert from 2 ring shards to whole.
    run = resumed(saved("moe_tsp2_ep2_expert_ring"), "moe_tsp1_ep2", "--no-load-rng")
    assert_continues(run, reference(2, TINY_CONFIG, *MOE, *SHARED_EXPERT))
