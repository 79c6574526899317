"""Every ``configs/*.yaml``: header convention, real Megatron flags, TSP and Megatron validation at the GPU
count it states, and the model it builds on one rank at reduced depth.

Header convention: each config carries the line ``# gpus: N``, the world size its layout assumes (GPUs; CPU
ranks for the ``*_cpu`` configs). Validation runs the entry point's own ``parse_tsp_args`` (config
expansion, Megatron's parser with the TSP flags, ``validate_tsp_args``, ``apply_tsp_layout``, Megatron's
``validate_args``) with ``WORLD_SIZE=N``. The build forks a child that joins torch's fake process group as
a rank of the N-rank job, builds the D-way TSP mesh and the GPT model on the meta device (real widths, 2
layers per pipeline stage, no memory), and reports its parameters; the parent compares the per-rank count
with one derived from the YAML alone (sharded along the TSP axis, experts split over expert parallelism).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import yaml
from megatron.training.arguments import add_megatron_arguments

from megatron_tsp.args import add_tsp_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPUS_HEADER = re.compile(r"^#\s*gpus:\s*(\d+)\s*$", re.MULTILINE)
LAYERS_PER_STAGE = 2  # reduced depth of the built model


def config_id(path: Path) -> str:
    return path.stem


def flags_of(path: Path) -> dict[str, Any]:
    """The config's flag map, keys without a leading ``--``."""
    return {str(key).lstrip("-"): value for key, value in (yaml.safe_load(path.read_text()) or {}).items()}


def stated_gpus(path: Path) -> int:
    match = GPUS_HEADER.search(path.read_text())
    assert match, f"{path.name}: no '# gpus: N' header line (the world size it assumes)"
    return int(match.group(1))


def parse_and_validate(path: Path, world: int, rank: int = 0, *extra: str) -> argparse.Namespace:
    """The entry point's parse + TSP validation + Megatron validation, as rank ``rank`` of ``world``."""
    from megatron_tsp.pretrain_gpt import parse_tsp_args

    env = {"WORLD_SIZE": str(world), "RANK": str(rank)}
    with mock.patch.object(sys, "argv", ["pretrain_gpt"]), mock.patch.dict(os.environ, env):
        return parse_tsp_args(["--config", str(path), *extra])


# --------------------------------------------------------------------------------------------------------
# Header and flags


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_header_and_flags(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), f"{path.name}: starts with a header comment saying what it is for"
    gpus = stated_gpus(path)
    assert gpus >= 1
    flags = flags_of(path)
    assert "tsp-size" in flags, f"{path.name}: states its tsp-size"
    parser = add_tsp_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    known = {option: action for action in parser._actions for option in action.option_strings}
    for key, value in flags.items():
        action = known.get(f"--{key}")
        assert action is not None, f"{path.name}: --{key} is not a Megatron 0.19.2 or TSP flag"
        if value is True:
            assert action.nargs == 0, f"{path.name}: --{key} takes a value, not `true`"
        assert not isinstance(value, dict), f"{path.name}: --{key} is nested; configs are flat"
    # Runs out of the box: no data or tokenizer files; without --data-path Megatron uses mock samples, so a
    # user adds --data-path on the command line (a config that set mock-data would make that an error).
    assert "mock-data" not in flags and flags.get("tokenizer-type") == "NullTokenizer"
    assert "vocab-size" in flags and "data-path" not in flags and "tokenizer-model" not in flags
    assert "--data-path" in text, f"{path.name}: header says how to use real data"


# --------------------------------------------------------------------------------------------------------
# Validation at the stated GPU count


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_validates_at_stated_gpu_count(path: Path) -> None:
    gpus, flags = stated_gpus(path), flags_of(path)
    args = parse_and_validate(path, gpus)
    tsp, pp = flags["tsp-size"], flags.get("pipeline-model-parallel-size", 1)
    assert args.tsp_size == tsp and args.world_size == gpus
    assert args.tensor_model_parallel_size == tsp  # the tsp axis takes the tensor-parallel slot
    assert args.sequence_parallel == (tsp > 1)
    assert args.data_parallel_size == gpus // (tsp * pp)
    # Megatron checks this only when training starts (micro-batch calculator): catch it here.
    assert args.global_batch_size % (args.micro_batch_size * args.data_parallel_size) == 0
    if flags.get("num-experts"):
        assert args.expert_tensor_parallel_size == 1
        assert flags["num-experts"] % args.expert_model_parallel_size == 0
        assert gpus % (args.expert_model_parallel_size * pp) == 0


def test_validation_rejects_a_world_the_layout_does_not_fit() -> None:
    """The check above can fail: 7B at tsp-size 8 on 12 GPUs is refused with the TSP message."""
    from megatron_tsp.args import TSPConfigError

    with pytest.raises(TSPConfigError, match="world size 12 is not divisible by --tsp-size 8"):
        parse_and_validate(ROOT / "configs" / "tsp_paper_7b.yaml", 12)


# --------------------------------------------------------------------------------------------------------
# Model built on one rank of the stated layout (fake process group, meta device)


def expected_rank_params(flags: dict[str, Any], first_stage: bool, last_stage: bool, layers: int,
                         expert_ring: bool = False) -> int:
    """Parameters one rank holds, from the YAML alone: the TP-shard layout TSP uses (weights of attention,
    MLP, embedding and output layer split D ways; norms and the router replicated; experts whole, split
    over expert parallelism, or with ``expert_ring`` each also split D ways)."""
    assert flags.get("disable-bias-linear") is True, "extend this count for linear biases"
    d = flags["tsp-size"]
    ep = flags.get("expert-model-parallel-size", 1)
    h, heads = flags["hidden-size"], flags["num-attention-heads"]
    groups = flags["num-query-groups"] if flags.get("group-query-attention") else heads
    head_dim = flags.get("kv-channels", h // heads)
    gate = 2 if flags.get("swiglu") else 1
    multiple = flags.get("make-vocab-size-divisible-by", 128) * d
    vocab = math.ceil(flags["vocab-size"] / multiple) * multiple

    qkv = (heads + 2 * groups) * head_dim // d * h
    proj = h * (heads * head_dim // d)
    qk_norm = 2 * head_dim if flags.get("qk-layernorm") else 0
    attention = h + qkv + proj + qk_norm  # input norm + projections
    experts = flags.get("num-experts")
    if experts:
        assert flags.get("moe-layer-freq", 1) == 1, "extend this count for mixed dense/MoE layers"
        assert flags.get("expert-tensor-parallel-size", 1) == 1
        moe_ffn = flags.get("moe-ffn-hidden-size", flags["ffn-hidden-size"])
        expert_shards = d if expert_ring else 1
        mlp = h + experts * h + experts // ep * (gate * moe_ffn * h + moe_ffn * h) // expert_shards  # norm, router
    else:
        ffn = flags["ffn-hidden-size"]
        mlp = h + gate * ffn // d * h + h * (ffn // d)  # norm + fc1 + fc2
    embedding = vocab // d * h
    total = layers * (attention + mlp)
    if first_stage:
        total += embedding
    if last_stage:
        total += h  # final norm
        if flags.get("untie-embeddings-and-output-weights") or not first_stage:
            total += embedding  # output layer (a tied one is a separate copy on a later stage)
    return total


def _in_fork(fn: Callable[..., Any], args: tuple, conn: Any) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # Megatron prints its whole argument table; keep the test log readable
        conn.send((True, fn(*args)))
    except BaseException:  # report everything, asserts and SystemExit included
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def run_forked(fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> Any:
    """``fn(*args)`` in a forked child (fresh Megatron globals, no process group in the parent); its return
    value (which must pickle) or its traceback as ``RuntimeError``."""
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_fork, args=(fn, args, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise RuntimeError(f"forked child did not answer within {timeout_s:.0f} s")
        ok, value = receive.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if not ok:
        raise RuntimeError(f"forked child failed:\n{value}")
    return value


def build_on_rank(path: Path, world: int, rank: int, layers: int, *extra: str) -> dict[str, Any]:
    """In a forked child: rank ``rank`` of a ``world``-rank fake job builds its model chunk on meta (config
    plus ``extra`` flags)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.global_vars import set_global_variables
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_tsp.megatron_compat import cuda_to_cpu
    from megatron_tsp.mesh import get_tsp_world_size, initialize_model_parallel
    from megatron_tsp.plan import resolve_auto_schedules
    from megatron_tsp.pretrain_gpt import model_provider
    from megatron_tsp.specs import TSPMLP

    # CPU initialisation: the GPU path allocates on torch.cuda.current_device(), which the meta device
    # context cannot override.
    args = parse_and_validate(path, world, rank, "--num-layers", str(layers), "--use-cpu-initialization", *extra)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    set_global_variables(args)  # get_args() for the model provider; builds the tokenizer, pads the vocab
    initialize_model_parallel(
        tsp_size=args.tsp_size, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size, order=args.tsp_order,
        create_gloo_process_groups=False)  # gloo groups would rendezvous through the fake store and hang
    resolve_auto_schedules(args)  # the GPU configs' auto schedules, as the entry point does here
    config = core_transformer_config_from_args(args)
    config.perform_initialization = False  # nothing to initialise on meta tensors
    config.init_model_with_meta_device = True  # skips the first/last-stage embedding all-reduce
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    with torch.device("meta"), cuda_to_cpu():
        model = model_provider(pre_process=first, post_process=last, config=config)
    params = dict(model.named_parameters())
    gathered = [layer for layer in model.decoder.layers
                if isinstance(layer.mlp, TSPMLP) and layer.mlp.schedule == "gather"]
    return {
        # each layer's gathered MLP has its fc1 gathers started by the layer's attention (specs.TSPTransformerLayer)
        "gathered_mlps": len(gathered),
        "prefetch_wired": all(layer.self_attention.prefetch == layer.mlp.prefetch_weights for layer in gathered),
        "tsp": get_tsp_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "first": first,
        "last": last,
        "count": sum(p.numel() for p in params.values()),
        "not_meta": [name for name, p in params.items() if not p.is_meta],
        "padded_vocab": args.padded_vocab_size,
    }


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_model_shards_per_rank(path: Path) -> None:
    gpus, flags = stated_gpus(path), flags_of(path)
    pp = flags.get("pipeline-model-parallel-size", 1)
    layers = LAYERS_PER_STAGE * pp
    # Rank 0 and the last rank: the first and last pipeline stages (pp is the outermost mesh axis), and the
    # first and last TSP / expert-parallel positions.
    for rank in sorted({0, gpus - 1}):
        built = run_forked(build_on_rank, path, gpus, rank, layers)
        assert built["tsp"] == flags["tsp-size"]
        assert built["ep"] == flags.get("expert-model-parallel-size", 1)
        assert built["first"] == (rank < gpus // pp) and built["last"] == (rank >= gpus - gpus // pp)
        assert built["not_meta"] == [], "parameters were allocated instead of built on meta"
        assert built["prefetch_wired"]
        expected = expected_rank_params(flags, built["first"], built["last"], LAYERS_PER_STAGE)
        assert built["count"] == expected, (
            f"{path.name} rank {rank}/{gpus}: {built['count']:,} parameters built, {expected:,} expected "
            f"(padded vocab {built['padded_vocab']})")


def test_mixtral_with_the_expert_ring_holds_an_eighth_of_each_expert() -> None:
    """--tsp-expert-ring on the Mixtral config at its 64 GPUs: experts sharded over the 8 TSP ranks (expert-TP
    8, still EP 8), so each rank builds 1/8 of its expert's weights (the ring's modules included)."""
    path = ROOT / "configs" / "mixtral_8x7b.yaml"
    gpus, flags = stated_gpus(path), flags_of(path)
    built = run_forked(build_on_rank, path, gpus, gpus - 1, LAYERS_PER_STAGE, "--tsp-expert-ring",
                       "--expert-tensor-parallel-size", "8")  # the config pins it to 1
    assert built["not_meta"] == []
    assert built["count"] == expected_rank_params(flags, built["first"], built["last"], LAYERS_PER_STAGE,
                                                  expert_ring=True)


@pytest.mark.parametrize("schedule", ["gather", "ring"])
def test_attention_starts_the_gathered_mlps_weights(schedule: str) -> None:
    """With --tsp-mlp-schedule gather every dense layer's attention starts its MLP's fc1 gathers
    (specs.TSPTransformerLayer); with the ring nothing is wired."""
    path = ROOT / "configs" / "tsp_paper_7b.yaml"
    built = run_forked(build_on_rank, path, stated_gpus(path), 0, LAYERS_PER_STAGE, "--tsp-mlp-schedule", schedule)
    assert built["gathered_mlps"] == (LAYERS_PER_STAGE if schedule == "gather" else 0)
    assert built["prefetch_wired"]
