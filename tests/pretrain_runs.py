"""Launch ``megatron_tsp.pretrain_gpt`` (or a script) on CPU ranks and read Megatron's iteration lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.multiprocess import free_port

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
    """``torchrun --nproc-per-node nproc -m megatron_tsp.pretrain_gpt --config config flags...``, with the
    ranks started directly in torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT): the
    same program and rendezvous, without torchrun's own process, which adds about 3 s to each of the
    suite's ~45 launches on 2 cores (test_pretrain_e2e runs the README's torchrun command itself). As under
    torchrun, the first rank to fail stops the others; the output is every rank's, in rank order."""
    command = [sys.executable, "-m", "megatron_tsp.pretrain_gpt", "--config", str(config), *flags]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
                  "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as logs:
        ranks = []
        for rank in range(nproc):
            log = open(Path(logs) / f"rank{rank}.txt", "w+")  # a file: a full pipe would block the rank
            env = {**os.environ, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        returncode = _wait_all([proc for proc, _ in ranks], timeout_s, command)
        output = []
        for _, log in ranks:
            log.seek(0)
            output.append(log.read())
            log.close()
    return _parse(returncode, "".join(output))


def _wait_all(procs: list[subprocess.Popen], timeout_s: float, command: list[str]) -> int:
    """Wait for every process; at the first nonzero exit (its code is returned) or at the timeout
    (``subprocess.TimeoutExpired``) kill the rest, as torchrun does."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [proc.poll() for proc in procs]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is not None or None not in codes or time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if failed is None and None in codes:
                raise subprocess.TimeoutExpired(command, timeout_s)
            return failed or 0
        time.sleep(0.05)
