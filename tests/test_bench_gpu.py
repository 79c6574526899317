"""The GPU benchmark script runs end to end (here on CPU, tiny model): what a device session will run.

No timing or memory ratio is asserted (benchmarks report numbers; tests do not judge them). What is checked:
every case produces a record with its measurements, and the rank built is one TSP rank's shard of the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [(), ("--output-layer", "megatron", "--keep-weight-shards")])
def test_bench_gpu_smoke_on_cpu(tmp_path: Path, extra: tuple[str, ...]) -> None:
    out = tmp_path / "tsp.json"
    done = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tsp", "4", "--layers", "2", "--hidden", "64",
                           "--heads", "4", "--ffn", "128", "--vocab", "256", "--seqs", "64,128", "--dtype", "fp32",
                           "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["seq"] for r in records] == [64, 128] and all(r["step_s"] > 0 for r in records)
    assert records[1]["achieved_TFLOPs"] * records[1]["step_s"] > records[0]["achieved_TFLOPs"] * records[0]["step_s"]
    # measured (the profiler's allocator peak here) and predicted peaks are both reported
    assert all(0 < r["peak_GiB"] < r["peak_plus_adam_GiB"] and r["model_peak_GiB"] > 0 for r in records)
    # One rank of D = 4: per layer two norms and a quarter of qkv, proj, fc1 (gated) and fc2; a quarter of the
    # embedding and of the (untied) output layer; the final norm.
    h, ffn, vocab, d = 64, 128, 256, 4
    layer = 2 * h + (3 * h * h + h * h + 2 * ffn * h + ffn * h) // d
    assert all(r["params_per_rank"] == 2 * layer + 2 * vocab // d * h + h for r in records)
