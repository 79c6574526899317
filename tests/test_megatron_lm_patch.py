"""``patches/megatron-core-0.19.2.patch`` applied to a copy of the installed ``megatron`` package.

The copy shadows the installed package in a subprocess (PYTHONPATH), which checks each hook at the place
the patch puts it: Megatron's own parser accepts ``--tsp-size`` and its ``validate_args`` maps it onto the
tensor-parallel slot (or refuses a missing TSP ``--spec``), ``_get_block_submodules`` calls the block-spec
function ``--spec`` names (and resolves ``auto`` TSP schedules there), ``get_batch_on_this_cp_rank`` puts the
batch in zigzag order, and megatron-tsp's own entry point still parses on the patched package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import megatron.core
import pytest

from tests.pretrain_runs import REPO, TINY_CONFIG

PATCH = REPO / "patches" / "megatron-core-0.19.2.patch"

CHECKS = r"""
import json, os, sys
import torch
import torch.distributed as dist
patched_root, config, rendezvous = sys.argv[1:]  # sys.argv is Megatron's command line below
import megatron.core
assert megatron.core.__file__.startswith(patched_root), megatron.core.__file__  # the patched copy

from megatron_tsp.megatron_compat import CPU_MEGATRON_FLAGS, prepare_megatron
prepare_megatron()  # torch.cuda stand-ins: Megatron's validate_args queries the device even on CPU
from megatron.training.arguments import parse_args, validate_args
import megatron.training.initialize  # the mesh-order hunk compiles
from megatron_tsp.args import TSPConfigError, expand_config

base = [*expand_config(["--config", config]), *CPU_MEGATRON_FLAGS, "--tsp-size", "2"]
report = {}

sys.argv = ["pretrain_gpt.py", *base]
try:
    validate_args(parse_args(), {})
except TSPConfigError as error:
    report["no_spec_error"] = str(error)

sys.argv = ["pretrain_gpt.py", *base, "--spec", "megatron_tsp.specs", "get_gpt_decoder_block_tsp_spec",
            "--tsp-keep-weight-shards"]
args = parse_args()
validate_args(args, {})
report["layout"] = [args.tsp_size, args.tensor_model_parallel_size, args.sequence_parallel, args.data_parallel_size]

from megatron.core.transformer.spec_utils import import_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, _get_block_submodules
stage_spec, calls = TransformerBlockSubmodules(layer_specs=[]), []
def block_spec(config, vp_stage=None, pp_rank=None):
    calls.append([config, vp_stage, pp_rank])
    return stage_spec
report["block_spec"] = [_get_block_submodules("config", block_spec, 1, 3) is stage_spec, calls]
report["spec_is_the_tsp_block_function"] = import_module(args.spec).__name__
from megatron.training.arguments import core_transformer_config_from_args
tsp_block = _get_block_submodules(core_transformer_config_from_args(args), import_module(args.spec), None, 0)
report["tsp_block_keeps_weight_shards"] = [
    layer.submodules.self_attention.params["keep_weight_shards"] for layer in tsp_block.layer_specs]

dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{rendezvous}")
from megatron.core.utils import get_batch_on_this_cp_rank
tokens = torch.arange(8).view(1, 8)
batch = {"tokens": tokens, "labels": tokens, "loss_mask": tokens, "position_ids": tokens,
         "attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool), "cu_seqlens": None}
out = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=dist.group.WORLD)
report["zigzag"] = [out[name].tolist() for name in ("tokens", "labels", "position_ids")] + [out["attention_mask"]]

# auto schedules: chosen at the first block spec, once the process group and the padded vocabulary exist
sys.argv = ["pretrain_gpt.py", *base, "--spec", "megatron_tsp.specs", "get_gpt_decoder_block_tsp_spec",
            "--tsp-attention-buckets-per-call", "auto", "--tsp-mlp-schedule", "auto"]
auto_args = parse_args()
validate_args(auto_args, {})
auto_args.padded_vocab_size = auto_args.vocab_size
from megatron.training.global_vars import set_args
set_args(auto_args)
auto_block = _get_block_submodules(core_transformer_config_from_args(auto_args), import_module(auto_args.spec),
                                   None, 0)
report["auto"] = [[layer.submodules.self_attention.params["buckets_per_call"] for layer in auto_block.layer_specs],
                  auto_args.tsp_attention_buckets_per_call, auto_args.tsp_mlp_schedule]

from megatron_tsp.pretrain_gpt import parse_tsp_args
own = parse_tsp_args(["--config", config, "--tsp-size", "2"])
report["own_entry_point"] = [own.tsp_size, own.tensor_model_parallel_size, own.sequence_parallel]
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def patched_megatron(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("megatron_lm")
    # ``megatron`` is a namespace package: locate it through megatron.core.
    shutil.copytree(Path(megatron.core.__file__).parents[1], root / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(["git", "apply", "--verbose", str(PATCH)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


def test_patched_megatron_runs_every_tsp_hook(patched_megatron: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(patched_megatron), "WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    done = subprocess.run([sys.executable, "-c", CHECKS, str(patched_megatron), str(TINY_CONFIG),
                           str(tmp_path / "rendezvous")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])

    assert "--spec megatron_tsp.specs get_gpt_decoder_block_tsp_spec" in report["no_spec_error"]
    assert report["layout"] == [2, 2, True, 2]  # TSP=2 in the tensor-parallel slot, SP on, DP = 4 / 2
    assert report["block_spec"] == [True, [["config", 1, 3]]]
    assert report["spec_is_the_tsp_block_function"] == "get_gpt_decoder_block_tsp_spec"
    assert report["tsp_block_keeps_weight_shards"] == [True, True]  # the TSP flag reaches each layer's spec
    zigzag = [0, 1, 6, 7, 2, 3, 4, 5]  # 2D = 4 chunks of 2 tokens, in order 0, 3, 1, 2
    assert report["zigzag"] == [[zigzag]] * 3 + [None]
    assert report["own_entry_point"] == [2, 2, True]
    assert report["auto"] == [[2, 2], 2, "gather"]  # the tiny model is host-bound: the fewest operators win

