"""End to end through Megatron's real ``pretrain()`` on CPU ranks (slowest tests of the suite): the README's
quickstart through torchrun, the others with their ranks started directly (``tests/pretrain_runs.py``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from tests.multiprocess import free_port
from tests.pretrain_runs import PRINTED_NORM_TOLERANCE, REPO, TINY_CONFIG, run_command
from tests.test_loss_parity import reference

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]


def test_quickstart_trains() -> None:
    """The README's first command: falling loss over 10 iterations of Megatron's loop on 4 CPU ranks."""
    run = run_command(["bash", "scripts/quickstart.sh"], timeout_s=600)
    assert run.returncode == 0, run.output[-4000:]
    assert len(run.losses) == 10, run.output[-4000:]
    assert all(math.isfinite(loss) for loss in run.losses)
    assert run.losses[-1] < run.losses[0] - 0.5, run.losses
    assert "running on 4 CPU rank(s) over gloo" in run.output


def test_cpu_data_parallel_matches_one_rank() -> None:
    """Megatron's 2-rank data-parallel losses equal its 1-rank losses on CPU: the CPU mode is faithful.

    Both are TSP=1 reference runs of test_loss_parity (cached: the 1-rank one is shared).
    """
    one, two = reference(1, TINY_CONFIG), reference(2, TINY_CONFIG)
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.grad_norms == pytest.approx(one.grad_norms, abs=PRINTED_NORM_TOLERANCE)


def test_bad_configuration_fails_on_every_rank_before_any_collective() -> None:
    """Each rank of a 2-rank job runs alone, with its own rendezvous port: had validation waited for a
    process group, it would hang for the missing peer; instead each exits at once with the message.
    (Under torchrun the first failing rank gets the others killed, possibly before they print.)"""
    flags = ["--config", str(TINY_CONFIG), "--tsp-size", "2", "--seq-length", "102", "--max-position-embeddings",
             "102"]
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "megatron_tsp.pretrain_gpt", *flags], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(ranks):
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert f"[rank {rank}] megatron-tsp configuration error: --seq-length 102 is not divisible" in output, \
            output[-3000:]
