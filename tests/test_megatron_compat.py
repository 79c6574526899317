"""megatron_compat on CPU ranks: what must happen before Megatron is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.pretrain_runs import REPO

_FRESH_PROCESS = """
import sys
import megatron_tsp, megatron_tsp.attention, megatron_tsp.cost, megatron_tsp.mlp
assert not [m for m in sys.modules if m.startswith("megatron.")], "megatron_tsp imported Megatron"
from megatron_tsp.megatron_compat import prepare_megatron
prepare_megatron()
import megatron_tsp.pretrain_gpt
from megatron.core.fusions import fused_bias_swiglu
assert not hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"), "a jit_fuser function was compiled"
assert "torch._inductor.compile_fx" not in sys.modules, "torch's compiler was imported"
assert megatron_tsp.get_tsp_world_size.__module__ == "megatron_tsp.mesh"
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks only: with a GPU, Megatron's fused functions compile")
def test_cpu_ranks_import_megatron_without_torchs_compiler() -> None:
    """On a machine without a GPU (as pretrain_gpt.py runs it, in a fresh interpreter): importing
    megatron_tsp imports no Megatron (its mesh API resolves on first use), so that prepare_megatron() comes
    first and makes torch.compile a no-op: Megatron's jit-fused functions stay the plain functions (what
    disabling dynamo gave too) and torch's compiler is never imported (~1.5 s of every CPU rank's start)."""
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
