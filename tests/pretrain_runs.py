"""Launch ``megatron_tsp.pretrain_gpt`` (or a script) under torchrun and read Megatron's iteration lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_gpt_cpu.yaml"
# A tiny MoE on top of the tiny GPT: 4 experts, top-2, all-to-all dispatch, expert-parallel size 2.
MOE = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
       "--moe-aux-loss-coeff", "0.01", "--expert-model-parallel-size", "2")
# Megatron prints grad and params norms with 3 decimals: two runs that agree to float precision can still print
# values one unit apart when the true value sits on a rounding boundary.
PRINTED_NORM_TOLERANCE = 1.001e-3
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.E+-]+) .*?grad norm: ([0-9.]+)")
_PARAMS_NORM = re.compile(r"iteration\s+\d+/.*?params norm: ([0-9.]+)")
_MTP_LOSS = re.compile(r"iteration\s+\d+/.*?mtp_1 loss: ([0-9.E+-]+)")


@dataclass
class PretrainRun:
    returncode: int
    output: str
    losses: list[float]  # lm loss of each logged iteration (--log-interval 1)
    grad_norms: list[float]
    params_norms: list[float]  # only with --log-params-norm
    mtp_losses: list[float]  # the first multi-token prediction loss as printed, only with --mtp-num-layers


def _parse(returncode: int, output: str) -> PretrainRun:
    found = _ITERATION.findall(output)
    losses = [float(loss) for _, loss, _ in found]
    if len(losses) >= 2:
        # With --log-interval 1, Megatron 0.19.2 prints at the second logged iteration of a run the mean of
        # the first two iterations' losses; undo that so each entry is one iteration's loss (this matters
        # when comparing a resumed run with an uninterrupted one).
        losses[1] = 2 * losses[1] - losses[0]
    return PretrainRun(returncode, output, losses, [float(norm) for _, _, norm in found],
                       [float(norm) for norm in _PARAMS_NORM.findall(output)],
                       [float(loss) for loss in _MTP_LOSS.findall(output)])


def run_command(command: list[str], timeout_s: float = 300.0) -> PretrainRun:
    """Run ``command`` from the repo root; return its exit code, combined output and parsed iterations."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    return _parse(done.returncode, done.stdout + done.stderr)


def pretrain(nproc: int, *flags: str, config: Path = TINY_CONFIG, timeout_s: float = 300.0) -> PretrainRun:
    """``torchrun --nproc-per-node nproc -m megatron_tsp.pretrain_gpt --config config flags...``."""
    return run_command([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(nproc), "-m", "megatron_tsp.pretrain_gpt",
                        "--config", str(config), *flags], timeout_s)
