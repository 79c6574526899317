"""TSP output layer and loss (vocabulary ring) against a single-device cross entropy, its bytes, residency."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tsp.comm import comm_bytes, track_shard_residency
from megatron_tsp.output import tsp_vocab_parallel_loss
from tests.multiprocess import run_on_ranks
from tests.numerics import TOLERANCE, assert_rel_close

CASES = [  # (batch, seq_len, hidden, vocab, dtype)
    (2, 16, 32, 64, torch.float32),
    (3, 24, 16, 96, torch.float64),
    (1, 8, 32, 128, torch.float32),
]


def _run_cases(rank: int, tsp_size: int) -> None:
    group = dist.group.WORLD
    for batch, seq_len, h, vocab, dtype in CASES:
        gen = torch.Generator().manual_seed(7)
        hidden = torch.randn(seq_len, batch, h, generator=gen, dtype=torch.float64)
        weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64) * h ** -0.5
        labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        grad_losses = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)

        ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = F.cross_entropy(F.linear(ref_hidden, ref_weight).flatten(0, 1), labels.t().flatten(),
                              reduction="none").view(seq_len, batch).t()
        ref.backward(grad_losses)

        rows, vocab_rows = seq_len // tsp_size, vocab // tsp_size
        local_hidden = hidden[rank * rows:(rank + 1) * rows].to(dtype).requires_grad_()
        local_weight = weight[rank * vocab_rows:(rank + 1) * vocab_rows].to(dtype).requires_grad_()
        with track_shard_residency() as residency:
            with comm_bytes() as forward_bytes:
                losses = tsp_vocab_parallel_loss(local_hidden, local_weight, labels, group)
            with comm_bytes() as backward_bytes:
                losses.backward(grad_losses.to(losses.dtype))

        what = f"B={batch} S={seq_len} h={h} V={vocab} {dtype}"
        tol = TOLERANCE[dtype]
        assert losses.shape == (batch, seq_len) and losses.dtype == torch.promote_types(dtype, torch.float32)
        assert_rel_close(losses.detach(), ref.detach(), tol, f"{what} losses")
        assert_rel_close(local_hidden.grad, ref_hidden.grad[rank * rows:(rank + 1) * rows], tol, f"{what} dhidden")
        assert_rel_close(local_weight.grad, ref_weight.grad[rank * vocab_rows:(rank + 1) * vocab_rows], tol,
                         f"{what} dweight")

        elem, share = torch.empty(0, dtype=dtype).element_size(), Fraction(tsp_size - 1, tsp_size)
        weight_bytes = vocab * h * elem * share
        loss_bytes = batch * seq_len * max(elem, 4) * share
        assert {k: v for k, v in forward_bytes.bytes_by_op.items() if v} == \
               {k: v for k, v in {"ring_send": weight_bytes, "all_gather": loss_bytes}.items() if v}, what
        assert {k: v for k, v in backward_bytes.bytes_by_op.items() if v} == \
               ({"ring_send": vocab * h * (elem + max(elem, 4)) * share} if tsp_size > 1 else {}), what
        assert dict(residency.peak) == ({} if tsp_size == 1 else {"weight": 2, "grad": 2}), what


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_vocab_ring_loss_matches_cross_entropy(tsp_size: int) -> None:
    run_on_ranks(_run_cases, tsp_size)


def test_output_processor_gives_logits_without_labels() -> None:
    """Without labels (generation) GPTModel's output processor hands back Megatron's logits, [b, s, v]."""
    from megatron_tsp.specs import tsp_output_loss

    hidden = torch.randn(5, 2, 3)
    calls = []

    def output_layer(hidden_states, weight=None, runtime_gather_output=None):
        calls.append((weight, runtime_gather_output))
        return hidden_states * 2, None

    logits = tsp_output_loss(hidden_states=hidden, output_layer=output_layer, output_weight=None, labels=None,
                             config=None, runtime_gather_output=True)
    assert torch.equal(logits, (hidden * 2).transpose(0, 1)) and logits.is_contiguous()
    assert calls == [(None, True)]
