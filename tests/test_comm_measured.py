"""Bytes the TSP collectives move in real training (Megatron's loop, CPU ranks) against the cost model.

``--tsp-report-comm-bytes`` counts every TSP collective (comm.py's per-rank convention) over the whole run;
``megatron_tsp.cost`` predicts the same per layer and micro-batch. The counted runs are the loss-parity runs
themselves (test_loss_parity, 10 iterations), at two shapes: D=4 with MHA, and D=2 with GQA and full
recompute (whose backward repeats the forward's collectives). The bar is 1%; in fact they agree exactly.
"""

from __future__ import annotations

import json
import re

import pytest

from megatron_tsp.cost import Layout, ModelShape, Workload, bytes_by_op, layer_comm
from tests.test_loss_parity import tsp_run

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

ITERATIONS, MICRO_BATCHES = 10, 2  # tiny config: global batch 4 = 2 micro-batches of 2 (no data parallelism)
_REPORT = re.compile(r"megatron-tsp comm bytes per rank over \d+ iterations: (\{.*\})")

CASES = {  # loss-parity case: (tsp size, kv groups, recompute)
    "tsp4": (4, 4, "none"),
    "tsp2_gqa_recompute_full": (2, 2, "full"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counted_bytes_match_the_cost_model(name: str) -> None:
    tsp, kv_groups, recompute = CASES[name]
    run = tsp_run(name)
    assert run.returncode == 0, run.output[-4000:]
    counted = json.loads(_REPORT.search(run.output).group(1))

    # The tiny config (configs/tiny_gpt_cpu.yaml): fp32, SwiGLU, no biases, sequence length 128.
    model = ModelShape(hidden=64, layers=2, heads=4, kv_groups=kv_groups, head_dim=16, ffn=256, vocab=1024)
    work = Workload(micro_batch=2, seq_len=128, param_bytes=4, act_bytes=4, recompute=recompute)
    per_layer = bytes_by_op(layer_comm(model, work, Layout(kind="TSP", tensor=tsp), moe=False).transfers)
    expected = {op: float(nbytes * model.layers * MICRO_BATCHES * ITERATIONS) for op, nbytes in per_layer.items()}

    assert counted.keys() == expected.keys()
    for op, nbytes in expected.items():
        assert counted[op] == pytest.approx(nbytes, rel=0.01), op
