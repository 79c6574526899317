"""Bytes the TSP collectives move in a real training step (Megatron's loop, CPU ranks) against the cost model.

``--tsp-report-comm-bytes`` counts every TSP collective (comm.py's per-rank convention) over the whole run;
``megatron_tsp.cost`` predicts the same per layer and micro-batch. The bar is 1%; in fact they agree exactly.
"""

from __future__ import annotations

import json
import re

import pytest

from megatron_tsp.cost import Layout, ModelShape, Workload, bytes_by_op, layer_comm
from tests.pretrain_runs import pretrain

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

ITERATIONS, MICRO_BATCHES = 3, 4  # tiny config: global batch 8 = 4 micro-batches of 2 (no data parallelism)
_REPORT = re.compile(r"megatron-tsp comm bytes per rank over \d+ iterations: (\{.*\})")

CASES = {  # name: (tsp size, kv groups, sequence length, extra flags)
    "tsp4_longer_sequence": (4, 4, 256, ()),
    "tsp2_gqa_full_recompute": (2, 2, 128, ("--group-query-attention", "--num-query-groups", "2",
                                            "--recompute-granularity", "full", "--recompute-method", "uniform",
                                            "--recompute-num-layers", "1")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counted_bytes_match_the_cost_model(name: str) -> None:
    tsp, kv_groups, seq_len, flags = CASES[name]
    run = pretrain(tsp, "--tsp-size", str(tsp), "--train-iters", str(ITERATIONS), "--seq-length", str(seq_len),
                   "--max-position-embeddings", str(seq_len), "--tsp-report-comm-bytes", *flags)
    assert run.returncode == 0, run.output[-4000:]
    counted = json.loads(_REPORT.search(run.output).group(1))

    # The tiny config (configs/tiny_gpt_cpu.yaml): fp32, SwiGLU, no biases.
    model = ModelShape(hidden=64, layers=2, heads=4, kv_groups=kv_groups, head_dim=16, ffn=256, vocab=1024)
    recompute = "full" if "--recompute-granularity" in flags else "none"
    work = Workload(micro_batch=2, seq_len=seq_len, param_bytes=4, act_bytes=4, recompute=recompute)
    per_layer = bytes_by_op(layer_comm(model, work, Layout(kind="TSP", tensor=tsp), moe=False).transfers)
    expected = {op: float(nbytes * model.layers * MICRO_BATCHES * ITERATIONS) for op, nbytes in per_layer.items()}

    assert counted.keys() == expected.keys()
    for op, nbytes in expected.items():
        assert counted[op] == pytest.approx(nbytes, rel=0.01), op
