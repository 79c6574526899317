"""``auto`` TSP schedules in training: the planner's choice for the run, the same on every rank."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from megatron.training.arguments import parse_args

from megatron_tsp import plan
from megatron_tsp.args import TSPConfigError, add_tsp_args, configure_tsp, expand_config
from tests.multiprocess import run_on_ranks

SEVEN_B = Path(__file__).resolve().parents[1] / "configs" / "tsp_paper_7b.yaml"


def seven_b_args(seq: int, *flags: str, world: int = 8):
    """Megatron's namespace for the paper's 7B config at ``seq`` tokens on ``world`` ranks, TSP configured and
    the vocabulary padded as Megatron's tokenizer setup would (32000 needs no padding at D = 8)."""
    argv = ["pretrain_gpt", *expand_config(["--config", str(SEVEN_B), "--seq-length", str(seq),
                                            "--max-position-embeddings", str(seq), *flags])]
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, {"WORLD_SIZE": str(world)}):
        args = parse_args(extra_args_provider=add_tsp_args)
    configure_tsp(args)
    args.padded_vocab_size, args.rank = 32000, 0
    return args


@pytest.mark.parametrize("seq,expected", [(16384, (8, True)), (131072, (1, False))])
def test_auto_schedules_are_the_planners_choice(seq: int, expected: tuple[int, bool],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """On 8 H100s, the 7B config (full recompute) with both flags auto gets what the planner's TSP8 row shows:
    one attention call over the 8 buckets and the gathered MLP at 16K (host-bound), G = 1 and the ring at
    128K (a tie: the least memory wins). A flag given explicitly stays as given."""
    args = seven_b_args(seq, "--tsp-attention-buckets-per-call", "auto", "--tsp-mlp-schedule", "auto")
    chosen = plan.choose_tsp_schedules(args, plan.GPUS["h100"])
    assert (chosen.work.tsp_buckets_per_call, chosen.work.tsp_mlp_gather) == expected and chosen.fits
    plan.main(["--config", str(SEVEN_B), "--seq-length", str(seq), "--gpus", "8", "--all"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("TSP8 "))
    label = "TSP8" + (f" G={expected[0]}" if expected[0] > 1 else "") + (" MLP-gather" if expected[1] else "")
    assert row.startswith(label + " ") and f"{chosen.cost.memory.total / plan.GiB:.3g}" in row.split()
    fixed = plan.choose_tsp_schedules(seven_b_args(seq, "--tsp-attention-buckets-per-call", "2",
                                                   "--tsp-mlp-schedule", "auto"), plan.GPUS["h100"])
    assert fixed.work.tsp_buckets_per_call == 2


def test_auto_schedules_cost_multi_token_prediction() -> None:
    """With --mtp-num-layers the run's layout is costed with its prediction depths (one more layer, eh_proj and
    loss each): more memory and time than without, and still a choice (no refusal)."""
    flags = ("--tsp-attention-buckets-per-call", "auto", "--tsp-mlp-schedule", "auto")
    plain = plan.choose_tsp_schedules(seven_b_args(32768, *flags), plan.GPUS["h100"])
    mtp = plan.choose_tsp_schedules(seven_b_args(32768, *flags, "--mtp-num-layers", "2"), plan.GPUS["h100"])
    assert mtp.cost.memory.total > plain.cost.memory.total and mtp.cost.step_s > plain.cost.step_s and mtp.fits


def _resolve(rank: int, world_size: int, memories: list[float]) -> tuple[int | str, str] | str:
    args = seven_b_args(16384, "--tsp-attention-buckets-per-call", "auto", "--tsp-mlp-schedule", "auto")
    args.rank = rank
    hw = replace(plan.GPUS["h100"], memory_bytes=memories[rank])
    with mock.patch.object(plan, "running_hardware", return_value=hw):
        try:
            plan.resolve_auto_schedules(args)
        except TSPConfigError as error:
            return str(error)
    return args.tsp_attention_buckets_per_call, args.tsp_mlp_schedule


@pytest.mark.multiprocess
def test_resolve_auto_schedules_checks_that_every_rank_chose_the_same() -> None:
    """Two ranks (standing for two GPU models): with the same memory both take the choice; where one GPU is
    too small for the fast schedules (nothing fits: the leanest, G = 1 and the ring) both raise, naming the
    flags, instead of running mismatched collectives."""
    assert run_on_ranks(_resolve, 2, [80e9, 80e9]) == [(8, "gather")] * 2
    errors = run_on_ranks(_resolve, 2, [80e9, 1e9])
    assert errors[0] == errors[1] and "chose differently on different ranks" in errors[0]
    assert "pass both flags explicitly" in errors[0]
