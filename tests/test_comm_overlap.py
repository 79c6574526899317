"""The cost model's overlap flags against the schedules: which transfers compute hides is measured.

Each TSP schedule (attention with every G, the MLP ring and gathered MLP, the expert ring, the vocabulary
ring with and without predictions, multi-token prediction's gathered ``eh_proj``, and attention followed by
the gathered MLP whose fc1 gathers it starts, as a TSP layer runs them) runs forward and backward on gloo
ranks inside ``comm.track_overlap``, which splits the bytes of every collective into
hidden (a matrix product or attention kernel was dispatched between its issue and its wait) and exposed.
``cost.py``'s per-phase transfers, summed by op and ``hidden`` flag, must equal that split exactly: the
step-time estimate charges exposed transfers in full and hides the others behind compute, so a flag that
does not describe the code is a wrong estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tsp.attention import tsp_attention
from megatron_tsp.comm import Overlap, track_overlap
from megatron_tsp.cost import (Layout, ModelShape, Transfer, Workload, _eh_proj_comm, _output_comm, _weight_ring_comm,
                               tsp_attention_comm, tsp_mlp_comm)
from megatron_tsp.linear import tsp_gathered_linear
from megatron_tsp.mlp import prefetch_gathered_fc1, tsp_expert_mlps, tsp_mlp
from megatron_tsp.output import tsp_vocab_parallel_loss, tsp_vocab_parallel_loss_and_predictions
from megatron_tsp.zigzag import gathered_positions, local_positions
from tests.multiprocess import run_on_ranks

pytestmark = pytest.mark.multiprocess

Split = dict[tuple[str, bool], Fraction]  # (op, hidden) -> bytes


@dataclass(frozen=True)
class Case:
    schedule: str  # "attention", "mlp", "layer", "experts", "vocab", "vocab+predictions" or "eh_proj"
    model: ModelShape
    work: Workload


MODEL = ModelShape(hidden=32, layers=1, heads=8, kv_groups=4, head_dim=4, ffn=48, vocab=256)
FP32 = Workload(micro_batch=2, seq_len=32, param_bytes=4, act_bytes=4)
EXPERTS = 2  # local experts of the expert-ring case, each of MODEL.ffn


def _cases(d: int) -> list[Case]:
    biased = replace(MODEL, qkv_bias=True, linear_bias=True)
    cases = [Case("attention", model, replace(FP32, tsp_buckets_per_call=g, tsp_keep_weights=keep))
             for g in range(1, d + 1) if d % g == 0 for model in (MODEL, biased) for keep in (False, True)]
    cases += [Case("mlp", model, replace(FP32, tsp_mlp_gather=gather, tsp_keep_weights=keep))
              for model in (MODEL, replace(biased, gated=False)) for gather in (False, True) for keep in (False, True)]
    cases += [Case("layer", model, replace(FP32, tsp_buckets_per_call=g, tsp_mlp_gather=True))
              for g in sorted({1, d}) for model in (MODEL, replace(biased, gated=False))]
    return cases + [Case(schedule, MODEL, FP32) for schedule in ("experts", "vocab", "vocab+predictions", "eh_proj")]


def _modelled(case: Case, d: int) -> tuple[Split, Split]:
    """The cost model's forward and backward bytes by (op, hidden) for one schedule."""
    if case.schedule == "attention":
        comm = tsp_attention_comm(case.model, case.work, d)
    elif case.schedule == "mlp":  # alone: nothing started its fc1 gathers
        comm = tsp_mlp_comm(case.model, case.work, d, case.model.ffn, prefetched=False)
    elif case.schedule == "layer":
        comm = tsp_attention_comm(case.model, case.work, d) + tsp_mlp_comm(case.model, case.work, d, case.model.ffn)
    elif case.schedule == "experts":
        comm = _weight_ring_comm("experts", EXPERTS * case.model.mlp_weights(case.model.ffn), case.work, d, False)
    else:
        layout, x = Layout("TSP", tensor=d), Fraction(0)  # x: the activation size, which TSP's terms do not use
        comm = (_eh_proj_comm(case.model, case.work, layout, x) if case.schedule == "eh_proj" else
                _output_comm(case.model, case.work, layout, x, predictions=case.schedule == "vocab+predictions"))

    def split(transfers: tuple[Transfer, ...]) -> Split:
        out: Split = defaultdict(Fraction)
        for t in transfers:
            out[t.op, t.hidden] += t.nbytes
        return dict(out)
    return split(comm.forward), split(comm.backward)


def _measured(overlap: Overlap) -> Split:
    split = {(op, True): n for op, n in overlap.hidden.items()}
    split.update({(op, False): n for op, n in overlap.exposed.items()})
    return {key: n for key, n in split.items() if n}


def _param(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape) / shape[-1] ** 0.5).requires_grad_()


def _run(case: Case, rank: int, d: int) -> tuple[Split, Split]:
    """Forward and backward of one schedule on this rank's tokens, their bytes split by overlap."""
    model, work, group = case.model, case.work, dist.group.WORLD
    local = work.seq_len // d
    x = _param(local, work.micro_batch, model.hidden)
    fc1_rows = (2 if model.gated else 1) * model.ffn // d
    fc1 = [_param(fc1_rows, model.hidden), _param(fc1_rows) if model.linear_bias else None]
    prefetched = []  # the layer case's fc1 gathers, started by its attention

    def attention(prefetch: Callable[[], None] | None = None) -> torch.Tensor:
        rows = (model.heads + 2 * model.kv_groups) * model.head_dim // d
        return tsp_attention(x, _param(rows, model.hidden), _param(rows) if model.qkv_bias else None,
                             _param(model.hidden, model.heads * model.head_dim // d),
                             local_positions(work.seq_len, d, rank), gathered_positions(work.seq_len, d), group,
                             model.heads, model.kv_groups, keep_weights=work.tsp_keep_weights,
                             buckets_per_call=work.tsp_buckets_per_call, prefetch=prefetch)

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return tsp_mlp(h, *fc1, _param(model.hidden, model.ffn // d), group, activation=F.gelu, gated=model.gated,
                       keep_weights=work.tsp_keep_weights, schedule="gather" if work.tsp_mlp_gather else "ring",
                       prefetched_fc1=prefetched[0] if prefetched else None)
    with track_overlap() as forward:
        if case.schedule == "attention":
            out = attention()
        elif case.schedule == "mlp":
            out = mlp(x)
        elif case.schedule == "layer":
            out = mlp(attention(lambda: prefetched.append(prefetch_gathered_fc1(*fc1, group))))
        elif case.schedule == "experts":
            tokens = x.flatten(0, 1)
            experts = [(_param(2 * model.ffn // d, model.hidden), None, _param(model.hidden, model.ffn // d))
                       for _ in range(EXPERTS)]
            out = tsp_expert_mlps(tokens, [tokens.shape[0] - 3, 3], experts, group)
        elif case.schedule == "eh_proj":
            out = tsp_gathered_linear(torch.cat((x, x), dim=-1), _param(model.hidden // d, 2 * model.hidden), group)
        else:
            labels = torch.randint(model.vocab, (work.micro_batch, work.seq_len),
                                   generator=torch.Generator().manual_seed(0))
            weight = _param(model.vocab // d, model.hidden)
            if case.schedule == "vocab":
                out = tsp_vocab_parallel_loss(x, weight, labels, group)
            else:
                out = tsp_vocab_parallel_loss_and_predictions(x, weight, labels, group)[0]
    with track_overlap() as backward:
        out.sum().backward()
    return _measured(forward), _measured(backward)


def _run_cases(rank: int, d: int) -> list[tuple[Split, Split]]:
    torch.manual_seed(rank)
    return [_run(case, rank, d) for case in _cases(d)]


@pytest.mark.parametrize("d", [2, 4])
def test_modelled_overlap_is_the_schedules(d: int) -> None:
    by_rank = run_on_ranks(_run_cases, d)
    for case, *measured in zip(_cases(d), *by_rank):
        assert all(m == measured[0] for m in measured), case  # every rank waits alike
        forward, backward = measured[0]
        assert (forward, backward) == _modelled(case, d), case


def test_overlap_tracking_sees_compute_between_issue_and_wait() -> None:
    """The instrument itself: an all-gather waited for at once is exposed, one with a GEMM before its wait
    hidden; the bytes are the byte counters' (one rank: no transfer at all)."""
    def gather_twice(rank: int, d: int) -> tuple[Split, Split]:
        from megatron_tsp.comm import all_gather_seq
        t = torch.ones(4, 8)
        with track_overlap() as overlap:
            all_gather_seq(t, dist.group.WORLD).wait()
            pending = all_gather_seq(t, dist.group.WORLD)
            t @ t.t()
            pending.wait()
        return _measured(overlap)
    d = 2
    (measured, _) = run_on_ranks(gather_twice, d)
    nbytes = Fraction(4 * 8 * 4 * d * (d - 1), d)
    assert measured == {("all_gather", False): nbytes, ("all_gather", True): nbytes}
