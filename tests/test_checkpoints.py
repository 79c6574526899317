"""Checkpoints across layouts with Megatron's torch_dist format: a TSP=D checkpoint is a TP=D checkpoint.

Every run trains the tiny GPT for 6 iterations (the lr schedule depends on --train-iters); a saving run stops
after iteration 3 (--exit-interval 3), a loading run continues with iterations 4-6. All TSP layouts and
TSP=1 train identically (test_loss_parity), so a reload at any TSP degree must continue exactly like the
uninterrupted TSP=1 run. Plain TP=2 (Megatron's own layers, no sequence parallelism) computes slightly
differently on CPU, so TP=2 is checked by loading two checkpoints of the same state (written at TSP=4 and at
TSP=1) and getting the same next steps, and a TP=2 checkpoint by reloading it at TSP=2 and at TSP=1.
Resuming at the saving layout itself is checked bit for bit at TSP=2.

Not covered: the distributed optimizer's state. Without Apex or Transformer Engine, megatron-core 0.19.2
cannot reload it at all (DistributedOptimizer.state_dict asserts one Adam step over an empty state).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest

from tests.pretrain_runs import MOE, PRINTED_NORM_TOLERANCE, PretrainRun, pretrain

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

SIX = ("--train-iters", "6")
LAYOUTS = {  # name: (ranks, flags)
    "tsp1": (1, ("--tsp-size", "1")),
    "tsp2": (2, ("--tsp-size", "2")),
    "tsp4": (4, ("--tsp-size", "4")),
    "tp2": (2, ("--tensor-model-parallel-size", "2")),
    # MoE at expert-parallel size 2 (expert initial weights depend on it): TSP=2 x EP=2 and TSP=1 x EP=2 x DP=2.
    "moe_tsp2_ep2": (2, ("--tsp-size", "2", *MOE)),
    "moe_tsp1_ep2": (2, ("--tsp-size", "1", *MOE)),
}
ROOT = Path(tempfile.mkdtemp(prefix="tsp_ckpt_"))


def ok(run: PretrainRun, iterations: int) -> PretrainRun:
    assert run.returncode == 0 and len(run.losses) == iterations, run.output[-4000:]
    return run


@functools.cache
def uninterrupted(layout: str) -> PretrainRun:
    ranks, flags = LAYOUTS[layout]
    return ok(pretrain(ranks, *SIX, *flags), 6)


@functools.cache
def saved(layout: str) -> Path:
    """A checkpoint after iteration 3, written at ``layout``."""
    ranks, flags = LAYOUTS[layout]
    path = ROOT / layout
    ok(pretrain(ranks, *SIX, *flags, "--exit-interval", "3", "--save", str(path), "--save-interval", "100"), 3)
    return path


def resumed(checkpoint: Path, layout: str, *extra: str) -> PretrainRun:
    """Iterations 4-6 at ``layout`` from ``checkpoint`` (RNG state not loaded across layouts)."""
    ranks, flags = LAYOUTS[layout]
    return ok(pretrain(ranks, *SIX, *flags, "--load", str(checkpoint), *extra), 3)


@pytest.mark.parametrize("layout", ["tsp2", "tsp1"])
def test_tsp4_checkpoint_continues_like_the_uninterrupted_run(layout: str) -> None:
    run = resumed(saved("tsp4"), layout, "--no-load-rng")
    assert run.losses == pytest.approx(uninterrupted("tsp1").losses[3:], rel=1e-6)
    assert run.grad_norms == pytest.approx(uninterrupted("tsp1").grad_norms[3:], abs=PRINTED_NORM_TOLERANCE)


def test_tsp4_checkpoint_loads_at_plain_tp2_like_a_tsp1_checkpoint() -> None:
    from_tsp4 = resumed(saved("tsp4"), "tp2", "--no-load-rng")
    from_tsp1 = resumed(saved("tsp1"), "tp2", "--no-load-rng")
    assert from_tsp4.losses == pytest.approx(from_tsp1.losses, rel=1e-12)
    assert from_tsp4.grad_norms == pytest.approx(from_tsp1.grad_norms, abs=PRINTED_NORM_TOLERANCE)


def test_plain_tp2_checkpoint_loads_at_tsp2_and_tsp1_alike() -> None:
    at_tsp2 = resumed(saved("tp2"), "tsp2", "--no-load-rng")
    at_tsp1 = resumed(saved("tp2"), "tsp1", "--no-load-rng")
    assert at_tsp2.losses == pytest.approx(at_tsp1.losses, rel=1e-6)
    assert at_tsp2.grad_norms == pytest.approx(at_tsp1.grad_norms, abs=PRINTED_NORM_TOLERANCE)
    # ... and it is TP=2's own state: its next steps are not those of the (slightly different) TSP=1 run.
    assert at_tsp1.losses != uninterrupted("tsp1").losses[3:]


def test_resume_at_the_same_layout_is_bit_identical() -> None:
    run = resumed(saved("tsp2"), "tsp2")
    # Identical at the printed precision (rel=1e-12 only absorbs the float arithmetic of pretrain_runs).
    assert run.losses == pytest.approx(uninterrupted("tsp2").losses[3:], rel=1e-12)
    assert run.grad_norms == uninterrupted("tsp2").grad_norms[3:]


def test_moe_checkpoint_moves_between_tsp_layouts() -> None:
    run = resumed(saved("moe_tsp2_ep2"), "moe_tsp1_ep2", "--no-load-rng")
    assert run.losses == pytest.approx(uninterrupted("moe_tsp1_ep2").losses[3:], rel=1e-6)
    assert run.grad_norms == pytest.approx(uninterrupted("moe_tsp1_ep2").grad_norms[3:], abs=PRINTED_NORM_TOLERANCE)
