"""Bytes the TSP collectives move in real training (Megatron's loop, CPU ranks) against the cost model.

``--tsp-report-comm-bytes`` counts every TSP collective (comm.py's per-rank convention) over the whole run;
``megatron_tsp.cost`` predicts the same per layer and micro-batch, plus the output layer's vocabulary ring and
each multi-token prediction depth. The counted runs are the loss-parity runs themselves (test_loss_parity,
10 iterations), at nine shapes: D=4 with MHA, D=2 with GQA and full recompute (whose backward repeats the
forward's collectives), D=2 with one of two layers recomputed (block; attention as one call over both head
buckets, the MLP by gathered weights), D=2 with weight shards kept for backward, D=2 with selective
recompute of the MLPs and norms (their ring forward repeated), D=2 with one MTP depth (attention as one
call) and with two MTP depths under full recompute (each depth's eh_proj and layer forward repeated), and
D=2 MoE with the expert ring, without and with selective recompute of the MoE layers (the expert ring's
forward repeated). The bar is 1%; in fact they agree exactly. The messages that carry them (collective
calls and sends, each charged a link latency by the model) must agree exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from megatron_tsp.cost import (Layout, ModelShape, Workload, bytes_by_op, edge_comm, layer_comm, layer_groups,
                               mtp_comm, pipeline_stages)
from tests.test_loss_parity import tsp_run

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

ITERATIONS = 10
_REPORT = re.compile(r"megatron-tsp comm bytes per rank over \d+ iterations: (\{.*\})")
_MESSAGES = re.compile(r"megatron-tsp comm messages per rank over \d+ iterations: (\{.*\})")
# The tiny config (configs/tiny_gpt_cpu.yaml): fp32, SwiGLU, no biases, sequence length 128, micro-batch 2 of
# a global batch of 4; the MoE cases add tests.pretrain_runs.MOE (4 experts of ffn 256, top-2).
TINY = ModelShape(hidden=64, layers=2, heads=4, kv_groups=4, head_dim=16, ffn=256, vocab=1024)
TINY_MOE = replace(TINY, experts=4, topk=2, expert_ffn=256, shared_expert_ffn=128)
# Transfers of Megatron's own modules, which comm.py does not see: the embedding, MoE dispatch, the shared
# expert.
MEGATRON_OWN = {"embedding", "MoE dispatch/combine", "shared expert"}

FP32 = Workload(micro_batch=2, seq_len=128, param_bytes=4, act_bytes=4)
CASES = {  # loss-parity case: (model, layout, workload); micro-batches per step = 2 / DP
    "tsp4": (TINY, Layout(kind="TSP", tensor=4), FP32),
    "tsp2_gqa_recompute_full": (replace(TINY, kv_groups=2), Layout(kind="TSP", tensor=2),
                                replace(FP32, recompute="full")),
    "tsp2_recompute_selective_keep_weight_shards": (TINY, Layout(kind="TSP", tensor=2),
                                                    replace(FP32, recompute="selective", tsp_keep_weights=True)),
    "tsp2_recompute_block_auto_schedules": (  # resolved to one attention call, the gathered MLP
        TINY, Layout(kind="TSP", tensor=2),
        replace(FP32, recompute="full", recompute_layers=1, tsp_buckets_per_call=2, tsp_mlp_gather=True)),
    "tsp2_recompute_selective_mlp_layernorm": (TINY, Layout(kind="TSP", tensor=2),
                                               replace(FP32, recompute="selective",
                                                       recompute_modules=("core_attn", "mlp", "layernorm"))),
    "tsp2_mtp_one_attention_call": (replace(TINY, mtp_layers=1), Layout(kind="TSP", tensor=2),
                                    replace(FP32, tsp_buckets_per_call=2)),
    "tsp2_mtp2_recompute_full_tied_embeddings": (replace(TINY, mtp_layers=2, tied_embeddings=True),
                                                 Layout(kind="TSP", tensor=2), replace(FP32, recompute="full")),
    "moe_tsp2_ep2_expert_ring_shared_expert": (TINY_MOE, Layout(kind="TSP", tensor=2, data=2, expert=2,
                                                                expert_ring=True), FP32),
    "moe_tsp2_ep2_expert_ring_recompute_moe_layernorm": (
        TINY_MOE, Layout(kind="TSP", tensor=2, data=2, expert=2, expert_ring=True),
        replace(FP32, recompute="selective", recompute_modules=("moe", "layernorm"))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counted_bytes_match_the_cost_model(name: str) -> None:
    model, layout, work = CASES[name]
    run = tsp_run(name)
    assert run.returncode == 0, run.output[-4000:]
    counted = json.loads(_REPORT.search(run.output).group(1))

    # Per micro-batch: every layer, and the model's edges (the output layer's vocabulary ring).
    (stage,) = pipeline_stages(model, layout)
    layers = tuple(transfer for count, moe, layer_work in layer_groups(work, stage)  # block recompute: two groups
                   for transfer in layer_comm(model, layer_work, layout, moe).transfers * int(count))
    mtp = mtp_comm(model, work, layout).transfers * stage.mtp_layers  # each prediction depth
    transfers = tuple(t for t in layers + mtp + edge_comm(model, work, layout, stage).transfers
                      if t.what not in MEGATRON_OWN)
    steps = ITERATIONS * (2 // layout.data)
    expected = {op: float(nbytes * steps) for op, nbytes in bytes_by_op(transfers).items()}

    assert counted.keys() == expected.keys()
    for op, nbytes in expected.items():
        assert counted[op] == pytest.approx(nbytes, rel=0.01), op
    # and the messages that carry them, which the model charges a link latency each
    messages: dict[str, int] = {}
    for transfer in transfers:
        messages[transfer.op] = messages.get(transfer.op, 0) + transfer.messages * steps
    assert json.loads(_MESSAGES.search(run.output).group(1)) == messages
