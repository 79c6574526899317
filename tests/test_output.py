"""TSP output layer and loss (vocabulary ring) against a single-device cross entropy, its bytes, residency."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tsp.comm import comm_bytes, track_shard_residency
from megatron_tsp.output import tsp_vocab_parallel_loss, tsp_vocab_parallel_loss_and_predictions
from tests.multiprocess import run_on_ranks
from tests.numerics import TOLERANCE, assert_rel_close, run_on_cudas_gemm_path

CASES = [  # (batch, seq_len, hidden, vocab, dtype)
    (2, 16, 32, 64, torch.float32),
    (3, 24, 16, 96, torch.float64),
    (1, 8, 32, 128, torch.float32),
    (2, 16, 32, 64, torch.bfloat16),
]


def _run_cases(rank: int, tsp_size: int, only_dtype: torch.dtype | None = None) -> None:
    group = dist.group.WORLD
    for batch, seq_len, h, vocab, dtype in CASES:
        if only_dtype is not None and dtype != only_dtype:
            continue
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


def _run_bf16_cases_as_on_cuda(rank: int, tsp_size: int) -> None:
    # each shard's fp32 logits out of their GEMM, its input-grad term added into the fp32 sum by its GEMM
    run_on_cudas_gemm_path(_run_cases, rank, tsp_size, ("aten.mm.dtype", "aten.addmm.dtype_out"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_vocab_ring_loss_matches_cross_entropy_with_cudas_fp32_gemms(tsp_size: int) -> None:
    """The bf16 case on the path a GPU takes: each shard's logits straight out of their GEMM in fp32, the input
    grad's terms GEMM-added into its fp32 sum."""
    run_on_ranks(_run_bf16_cases_as_on_cuda, tsp_size)


def _run_predictions(rank: int, tsp_size: int) -> None:
    group = dist.group.WORLD
    batch, seq_len, h, vocab = 2, 16, 8, 64
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(seq_len, batch, h, generator=gen)
    weight = torch.randn(vocab, h, generator=gen)
    tie = weight[vocab // 2 + 1] * 4  # long: its logit is these tokens' largest
    weight[5] = weight[vocab // 2 + 1] = weight[vocab - 1] = tie  # in the first, a middle and the last shard
    hidden[:4] = tie  # a three-way tie for these tokens, won by id 5
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    reference = F.linear(hidden, weight).argmax(-1).t()  # the first (smallest) id among equal maxima
    rows, vocab_rows = seq_len // tsp_size, vocab // tsp_size
    local_hidden = hidden[rank * rows:(rank + 1) * rows]
    local_weight = weight[rank * vocab_rows:(rank + 1) * vocab_rows]
    losses, predicted = tsp_vocab_parallel_loss_and_predictions(local_hidden, local_weight, labels, group)
    assert predicted.dtype == torch.int64 and torch.equal(predicted, reference), (predicted, reference)
    assert (reference[:, :4] == 5).all()
    assert torch.equal(losses, tsp_vocab_parallel_loss(local_hidden, local_weight, labels, group))


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_vocab_ring_predicts_the_argmax_of_the_whole_vocabulary(tsp_size: int) -> None:
    """Each token's predicted id (multi-token prediction's acceptance counts) is the argmax of its logits over
    the whole vocabulary, ties going to the smallest id as in Megatron's vocab-parallel argmax, whatever order
    the ring brings the shards in; the losses are the same as without predictions."""
    run_on_ranks(_run_predictions, tsp_size)


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


def _run_mtp_loss(rank: int, tsp_size: int, per_token: bool) -> None:
    from types import SimpleNamespace

    from megatron.core.transformer import multi_token_prediction as mtp

    from megatron_tsp.megatron_compat import cuda_to_cpu
    from megatron_tsp.mesh import initialize_model_parallel
    from megatron_tsp.specs import tsp_mtp_loss

    initialize_model_parallel(tsp_size=tsp_size)  # the data-parallel group MTP's logging averages over
    group = dist.group.WORLD
    depths, batch, seq_len, h, vocab = 2, 2, 16, 8, 32
    config = SimpleNamespace(mtp_num_layers=depths, mtp_detach_heads=False, mtp_loss_scaling_factor=0.3,
                             calculate_per_token_loss=per_token)
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(1 + depths, seq_len, batch, h, generator=gen, dtype=torch.float64)
    weight = torch.nn.functional.normalize(torch.randn(vocab, h, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    loss_mask = (torch.rand(batch, seq_len, generator=gen) > 0.3).double()
    # the first depth's hidden state points at its label (the next token but one): predicted right, so that the
    # acceptance counts are not all zero, masked or not
    hidden[1, :-1] = 2 * weight[labels[:, 1:].t()]

    def reference_layer(x: torch.Tensor, weight: torch.Tensor, runtime_gather_output: bool | None = None):
        return F.linear(x, weight), None

    reference_layer.gather_output = True  # full-vocabulary logits: Megatron's single-device argmax

    def cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.t().flatten(), reduction="none").view(
            logits.shape[:2]).t()

    rows, vocab_rows = seq_len // tsp_size, vocab // tsp_size
    runs = {}
    with cuda_to_cpu():
        for name in ("megatron", "tsp"):
            mtp.MTPLossLoggingHelper.clean_metrics_in_tracker()
            if name == "megatron":
                x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                out = mtp.process_mtp_loss(
                    hidden_states=x.flatten(0, 1), labels=labels, loss_mask=loss_mask, output_layer=reference_layer,
                    output_weight=w, runtime_gather_output=None, is_training=True,
                    compute_language_model_loss=cross_entropy, config=config)
            else:
                x = hidden[:, rank * rows:(rank + 1) * rows].clone().requires_grad_()
                w = weight[rank * vocab_rows:(rank + 1) * vocab_rows].clone().requires_grad_()
                shard_layer = SimpleNamespace(weight=None, tp_group=group)
                out = tsp_mtp_loss(hidden_states=x.flatten(0, 1), labels=labels, loss_mask=loss_mask,
                                   output_layer=shard_layer, output_weight=w, is_training=True, config=config)
            out.backward(torch.ones_like(out))  # MTPLossAutoScaler hands each depth's loss a grad of 1
            tracker = {key: mtp.MTPLossLoggingHelper.tracker[key].clone()
                       for key in ("loss_values", "correct_values", "total_values")}
            runs[name] = (out.detach(), x.grad, w.grad, tracker)
    (ref_out, ref_dx, ref_dw, ref_tracker), (out, dx, dw, tracker) = runs["megatron"], runs["tsp"]
    local = slice(rank * rows, (rank + 1) * rows)
    assert torch.equal(out, ref_out[local]), "the decoder's hidden states pass through"
    assert_rel_close(dx, ref_dx[:, local], 1e-10, "MTP hidden-state grads")
    assert_rel_close(dw, ref_dw[rank * vocab_rows:(rank + 1) * vocab_rows], 1e-10, "output weight grad")
    assert_rel_close(tracker["loss_values"], ref_tracker["loss_values"], 1e-10, "logged MTP losses")
    for key in ("correct_values", "total_values"):
        assert torch.equal(tracker[key], ref_tracker[key]), (key, tracker[key], ref_tracker[key])
    assert ref_tracker["total_values"].min() > 0 and ref_tracker["correct_values"][0] > 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence", "per-token"])
def test_mtp_loss_by_vocab_ring_matches_megatrons(tsp_size: int, per_token: bool) -> None:
    """Multi-token prediction's losses by the vocabulary ring (specs.tsp_mtp_loss, routed there by the
    process_mtp_loss patch) against megatron-core's process_mtp_loss with full-vocabulary logits on one device:
    two depths, a loss mask, fp64: the same grads of every depth's hidden states and of the output weight, the
    same logged losses and prediction acceptance counts, with and without --calculate-per-token-loss."""
    run_on_ranks(_run_mtp_loss, tsp_size, per_token)
