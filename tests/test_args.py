"""TSP flag validation: every bad configuration fails with a message naming the flag and the fix."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from megatron.training.arguments import parse_args

from megatron_tsp.args import (
    TSPConfigError,
    add_tsp_args,
    apply_tsp_layout,
    config_to_argv,
    expand_config,
    validate_tsp_args,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_gpt_cpu.yaml"


def parse(*flags: str, world: int = 4):
    """Megatron's own parser (with the TSP flags) on the tiny config plus ``flags``."""
    argv = ["pretrain_gpt", *expand_config(["--config", str(TINY), *flags])]
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, {"WORLD_SIZE": str(world)}):
        return parse_args(extra_args_provider=add_tsp_args)


RING = ("--tsp-size", "2", "--tsp-expert-ring", "--num-experts", "4")
BAD = [  # flags, world size, text the error must contain (the flag to change)
    (["--tsp-size", "4"], 6, "world size 6 is not divisible by --tsp-size 4"),
    (["--tsp-size", "2", "--pipeline-model-parallel-size", "2"], 6, "--pipeline-model-parallel-size 2"),
    (["--tsp-size", "2", "--tensor-model-parallel-size", "2"], 4, "drop --tensor-model-parallel-size"),
    (["--tsp-size", "8"], 8, "--num-attention-heads 4 is not divisible by --tsp-size 8"),
    (["--tsp-size", "4", "--group-query-attention", "--num-query-groups", "2"], 4,
     "--num-query-groups 2 is not divisible by --tsp-size 4"),
    (["--tsp-size", "4", "--ffn-hidden-size", "254"], 4, "--ffn-hidden-size 254 is not divisible"),
    (["--tsp-size", "4", "--seq-length", "100", "--max-position-embeddings", "100"], 4,
     "--seq-length 100 is not divisible by 2 x --tsp-size = 8"),
    (["--tsp-size", "2", "--context-parallel-size", "2"], 4, "drop --context-parallel-size"),
    (["--tsp-size", "2", "--use-megatron-fsdp"], 4, "--use-megatron-fsdp is not supported"),
    (["--tsp-size", "2", "--use-torch-fsdp2"], 4, "--use-torch-fsdp2 is not supported"),
    (["--tsp-size", "2", "--tp-comm-overlap"], 4, "--tp-comm-overlap is not supported"),
    (["--tsp-size", "2", "--reset-attention-mask"], 4, "--reset-attention-mask (packed sequences) is not"),
    (["--tsp-size", "2", "--multi-latent-attention"], 4, "--multi-latent-attention is not supported"),
    (["--tsp-size", "2", "--window-size", "16,0"], 4, "--window-size (sliding-window attention)"),
    (["--tsp-size", "2", "--softmax-type", "learnable"], 4, "use --softmax-type vanilla"),
    (["--tsp-size", "2", "--attention-output-gate"], 4, "--attention-output-gate is not supported"),
    (["--tsp-size", "2", "--qk-clip"], 4, "--qk-clip is not supported"),
    (["--tsp-size", "2", "--log-max-attention-logit"], 4, "--log-max-attention-logit is not supported"),
    (["--tsp-size", "2", "--experimental-attention-variant", "gated_delta_net"], 4,
     "--experimental-attention-variant is not supported"),
    (["--tsp-size", "2", "--fp8-format", "hybrid"], 4, "--fp8-format is not supported"),
    (["--tsp-size", "2", "--fp4-format", "e2m1"], 4, "--fp4-format is not supported"),
    (["--tsp-size", "2", "--cuda-graph-impl", "local"], 4, "--cuda-graph-impl local is not supported"),
    (["--tsp-size", "2", "--cuda-graph-impl", "transformer_engine"], 4,
     "--cuda-graph-impl transformer_engine is not supported"),
    (["--tsp-size", "2", "--enable-cuda-graph"], 4, "--enable-cuda-graph is not supported"),
    (["--tsp-size", "2", "--external-cuda-graph"], 4, "--external-cuda-graph is not supported"),
    (["--tsp-size", "2", "--tsp-order", "tsp-dp-pp"], 4, "--tsp-order"),
    (["--tsp-size", "4", "--tsp-attention-buckets-per-call", "3"], 4,
     "--tsp-attention-buckets-per-call 3 must divide --tsp-size 4: choose one of [1, 2, 4]"),
    (["--tsp-size", "2", "--tsp-attention-buckets-per-call", "auto", "--num-experts", "4", "--moe-layer-freq",
      "[1,0]"], 4, "with a --moe-layer-freq pattern"),
    (["--tsp-size", "2", "--attention-dropout", "0.1"], 4, "pass --attention-dropout 0"),
    (["--tsp-size", "2", "--position-embedding-type", "yarn"], 4, "--position-embedding-type yarn"),
    (["--tsp-size", "2", "--num-experts", "4", "--expert-tensor-parallel-size", "2"], 4,
     "use --expert-tensor-parallel-size 1"),
    (["--tsp-size", "2", "--expert-model-parallel-size", "3", "--num-experts", "3"], 4,
     "--expert-model-parallel-size 3"),
    # --tsp-expert-ring
    (["--tsp-expert-ring", "--num-experts", "4"], 1, "--tsp-expert-ring needs --tsp-size > 1"),
    (["--tsp-size", "2", "--tsp-expert-ring"], 4, "--tsp-expert-ring without --num-experts"),
    ([*RING, "--expert-tensor-parallel-size", "1"], 4, "drop --expert-tensor-parallel-size"),
    (["--tsp-size", "4", "--tsp-expert-ring", "--num-experts", "4", "--moe-ffn-hidden-size", "126"], 4,
     "--moe-ffn-hidden-size 126 is not divisible by --tsp-size 4"),
    ([*RING, "--expert-model-parallel-size", "4"], 4, "lower --expert-model-parallel-size"),
    ([*RING, "--moe-token-dispatcher-type", "flex"], 4, "use alltoall or allgather"),
    ([*RING, "--moe-grouped-gemm"], 4, "drop --moe-grouped-gemm"),
    ([*RING, "--tsp-order", "cp-tsp-ep-dp-pp"], 4, "use --tsp-order tsp-cp-ep-dp-pp"),
]


@pytest.mark.parametrize("flags,world,message", BAD, ids=[" ".join(case[0]) for case in BAD])
def test_bad_configuration_names_the_flag(flags: list[str], world: int, message: str) -> None:
    args = parse(*flags, world=world)
    with pytest.raises((TSPConfigError, ValueError)) as error:
        validate_tsp_args(args, world)
    assert message in str(error.value)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_buckets_per_call_is_a_positive_count_or_auto(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse("--tsp-size", "2", "--tsp-attention-buckets-per-call", value)
    assert "a positive count of head buckets, or auto" in capsys.readouterr().err
    assert parse("--tsp-size", "2", "--tsp-attention-buckets-per-call", "auto").tsp_attention_buckets_per_call == "auto"


@pytest.mark.parametrize("tsp,world", [(1, 1), (2, 4), (4, 8)])
def test_good_configuration_maps_tsp_onto_the_tensor_parallel_slot(tsp: int, world: int) -> None:
    args = parse("--tsp-size", str(tsp), world=world)
    validate_tsp_args(args, world)
    apply_tsp_layout(args)
    assert args.tensor_model_parallel_size == tsp
    assert args.sequence_parallel == (tsp > 1)
    assert args.expert_tensor_parallel_size == (1 if tsp > 1 else None)


def test_expert_ring_shards_experts_over_the_tsp_axis() -> None:
    args = parse(*RING, "--expert-model-parallel-size", "2", world=4)
    validate_tsp_args(args, 4)
    apply_tsp_layout(args)
    assert (args.tensor_model_parallel_size, args.expert_tensor_parallel_size) == (2, 2)


def test_expert_ring_refuses_biases_before_megatron_does() -> None:
    args = parse(*RING, world=4)
    args.add_bias_linear = True  # the tiny config disables biases, and Megatron has no flag to re-enable them
    with pytest.raises(TSPConfigError, match="add --disable-bias-linear"):
        validate_tsp_args(args, 4)


def test_config_file_and_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("--hidden-size: 32\nswiglu: true\nbias-gelu-fusion: false\nlr: 0.5\n"
                      "data-path: [a, b]\ntsp-size: 2\n")
    assert config_to_argv(config) == ["--hidden-size", "32", "--swiglu", "--lr", "0.5",
                                      "--data-path", "a", "b", "--tsp-size", "2"]
    argv = expand_config(["--lr", "0.1", "--config", str(config), "--tsp-size", "4"])
    assert argv[-4:] == ["--lr", "0.1", "--tsp-size", "4"]  # command-line flags come last and win
    args = parse("--tsp-size", "2", "--lr", "0.1")
    assert args.tsp_size == 2 and args.lr == 0.1 and args.hidden_size == 64


def test_config_errors(tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("MODEL_ARGS:\n  --hidden-size: 32\n")
    with pytest.raises(TSPConfigError, match="configs are flat"):
        config_to_argv(nested)
    with pytest.raises(TSPConfigError, match="--config needs a YAML file"):
        expand_config(["--config"])
