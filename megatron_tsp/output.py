"""TSP output layer and loss: vocabulary shards circulate, each rank scores its own tokens against all of them.

Rank p of a TSP group of size D holds its tokens' final hidden states ``hidden [S/D, B, h]`` (zigzag order)
and vocabulary shard p of the output weight, in Megatron's vocab-parallel layout: ``weight [V/D, h]``, rows
``[p*V/D, (p+1)*V/D)`` of the (padded) vocabulary. Megatron's TP+SP output layer all-gathers the hidden
states and holds fp32 logits ``[S, B, V/D]`` per rank; here the weight shards travel instead
(``weight_ring.py``) and a rank never holds more than one shard's logits of its own tokens,
``[S/D, B, V/D]``.

Forward: for each shard, the logits of the local tokens (fp32), folded into a running log-sum-exp and the
target token's logit; per-token loss = log-sum-exp - target logit. Backward: the shards circulate again;
each recomputes its logits, turns them into (softmax - one-hot) x dloss, adds that times the shard to the
input grad and hands back the shard's weight grad, which travels to its owner.

Communication per rank per micro-batch, bytes, for W = V*h output-weight elements (e, e_acc as in
``mlp.py``): forward ring_send W*e*(D-1)/D; backward ring_send W*(e + e_acc)*(D-1)/D. Plus an all_gather
of the per-token fp32 losses, B*S*4*(D-1)/D, so that Megatron's loss function sees the whole sequence.
Fewer bytes than gathering the hidden states (3 x B*S*h*a*(D-1)/D with its backward) once B*S exceeds about
V*(2e + e_acc)/(3a) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_tsp.comm import all_gather_seq, group_rank, group_size
from megatron_tsp.grads import add_linear_, linear_in, linear_weight_grads, weight_grad_for_autograd
from megatron_tsp.weight_ring import gather_shard_grads, visit_shards

__all__ = ["TSPVocabLossFunction", "tsp_vocab_parallel_loss", "tsp_vocab_parallel_loss_and_predictions"]


@dataclass(frozen=True)
class _VocabSpec:
    tsp_group: dist.ProcessGroup
    shard_rows: int  # V/D
    # The weight has other users in the graph (the tied input embedding, multi-token prediction's output
    # layer): its grad must go through autograd, where theirs is added to it, not straight into Megatron's
    # main_grad (grads.py), where DDP would then drop theirs.
    shared_weight: bool
    # Also find each token's predicted id (the argmax over the whole vocabulary; multi-token prediction logs
    # how often it is the label)
    predict: bool = False


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    """Logits and losses in fp32 (fp64 for fp64 models), as Megatron's vocab-parallel cross entropy."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _shard_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """Logits of the local tokens for one vocabulary shard: ``[S/D, B, h]`` x ``[V/D, h]`` -> ``[S/D, B, V/D]``."""
    return linear_in(hidden, weight, _loss_dtype(hidden))


def _locate_targets(labels: Tensor, spec: _VocabSpec) -> tuple[Tensor, Tensor]:
    """Once per pass: (the rank whose vocabulary shard holds each token's label ``[S/D, B]``, the label's row in
    that shard ``[S/D, B, 1]``, for gathering from and scattering into a shard's logits), so that a shard's
    targets are one comparison away. A label outside the vocabulary (negative) has no owner in the group."""
    return (torch.div(labels, spec.shard_rows, rounding_mode="floor"),
            torch.remainder(labels, spec.shard_rows).unsqueeze(-1))


class TSPVocabLossFunction(torch.autograd.Function):
    """Cross entropy of the local tokens by the vocabulary ring; see the module docstring.

    Inputs: hidden ``[S/D, B, h]``, labels ``[S/D, B]`` (vocabulary ids), spec, weight ``[V/D, h]`` (this
    rank's shard). Outputs: per-token losses ``[S/D, B]``, fp32 (fp64 for fp64 models), and with
    ``spec.predict`` each token's predicted id ``[S/D, B]`` (int64; the smallest id among equal maxima, as
    Megatron's vocab-parallel argmax), else an empty tensor; the ids have no grad.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, labels: Tensor, spec: _VocabSpec, weight: Tensor) -> tuple[Tensor, Tensor]:
        dtype = _loss_dtype(hidden)
        running_max = torch.full(labels.shape, -torch.inf, dtype=dtype, device=hidden.device)
        sum_exp = torch.zeros(labels.shape, dtype=dtype, device=hidden.device)
        target_logit = torch.zeros(labels.shape, dtype=dtype, device=hidden.device)
        predicted = torch.empty(labels.shape if spec.predict else (0,), dtype=torch.int64, device=hidden.device)

        target_owner, target_row = _locate_targets(labels, spec)

        def fold_shard(shard: list[Tensor], owner: int) -> None:
            logits = _shard_logits(hidden, shard[0])
            torch.where(target_owner == owner, logits.gather(-1, target_row).squeeze(-1), target_logit,
                        out=target_logit)
            if spec.predict:  # owners come in ring order: on a tie the smaller id wins
                shard_max, shard_best = logits.max(dim=-1)
                shard_best.add_(owner * spec.shard_rows)
                wins = (shard_max > running_max) | ((shard_max == running_max) & (shard_best < predicted))
                torch.where(wins, shard_best, predicted, out=predicted)
            else:  # the main loss: no index tensor per shard
                shard_max = logits.amax(dim=-1)
            new_max = torch.maximum(running_max, shard_max)
            sum_exp.mul_(torch.exp(running_max - new_max)).add_(torch.exp(logits - new_max.unsqueeze(-1)).sum(-1))
            running_max.copy_(new_max)

        visit_shards([weight], spec.tsp_group, fold_shard)
        log_sum_exp = running_max + torch.log(sum_exp)
        ctx.spec = spec
        ctx.save_for_backward(hidden, labels, weight, log_sum_exp)
        ctx.mark_non_differentiable(predicted)
        return log_sum_exp - target_logit, predicted

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        spec: _VocabSpec = ctx.spec
        hidden, labels, weight, log_sum_exp = ctx.saved_tensors
        dtype = _loss_dtype(hidden)
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        target_owner, target_row = _locate_targets(labels, spec)
        minus_one = torch.full((), -1, dtype=dtype, device=hidden.device)

        def shard_grads(shard: list[Tensor], owner: int) -> list[Tensor]:
            shard_weight = shard[0]
            grad_logits = torch.exp(_shard_logits(hidden, shard_weight) - log_sum_exp.unsqueeze(-1))  # softmax
            minus_one_hot = torch.where(target_owner == owner, minus_one, 0.0).unsqueeze(-1)
            grad_logits.scatter_add_(-1, target_row, minus_one_hot)
            grad_logits = (grad_logits * grad_loss.unsqueeze(-1)).to(hidden.dtype)
            add_linear_(grad_hidden, grad_logits, shard_weight.t())  # += grad_logits @ shard_weight
            return linear_weight_grads(grad_logits, hidden)

        (own_grad,) = gather_shard_grads([weight], spec.tsp_group, shard_grads)
        grad_weight = own_grad.to(weight.dtype) if spec.shared_weight else weight_grad_for_autograd(weight, own_grad)
        return grad_hidden.to(hidden.dtype), None, None, grad_weight


class _GatherLosses(torch.autograd.Function):
    """All-gather per-token losses ``[S/D, B]`` -> ``[S, B]``; backward keeps this rank's rows. Every rank
    evaluates the same loss function on the gathered losses, so each rank's grad of its own rows is already
    the whole grad (summing over ranks would count it D times)."""

    @staticmethod
    def forward(ctx, losses: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.rows, ctx.rank = losses.shape[0], group_rank(group)
        return all_gather_seq(losses, group).wait()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def tsp_vocab_parallel_loss(hidden: Tensor, weight: Tensor, labels: Tensor, tsp_group: dist.ProcessGroup, *,
                            shared_weight: bool = False) -> Tensor:
    """Per-token cross entropy of a sequence-sharded model: hidden ``[S/D, B, h]`` (rank p's tokens, rows
    p*S/D.. of the sequence as the batch orders it), weight ``[V/D, h]`` (vocab shard p), labels ``[B, S]``
    (the whole sequence, as Megatron passes them) -> losses ``[B, S]`` (fp32 or fp64, Megatron's
    ``compute_language_model_loss`` shape), equal on every rank of the group. ``shared_weight``: the weight
    has other users whose grads autograd adds (the tied input embedding, multi-token prediction).
    """
    return _vocab_ring(hidden, weight, labels, tsp_group, shared_weight, predict=False)[0]


def tsp_vocab_parallel_loss_and_predictions(hidden: Tensor, weight: Tensor, labels: Tensor,
                                            tsp_group: dist.ProcessGroup, *,
                                            shared_weight: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`tsp_vocab_parallel_loss`, and each token's predicted id (argmax over the whole vocabulary, the
    smallest id among equal maxima) ``[B, S]`` int64, also gathered (one more all-gather of S x B ids)."""
    losses, predicted = _vocab_ring(hidden, weight, labels, tsp_group, shared_weight, predict=True)
    return losses, all_gather_seq(predicted, tsp_group).wait().t()


def _vocab_ring(hidden: Tensor, weight: Tensor, labels: Tensor, tsp_group: dist.ProcessGroup, shared_weight: bool,
                predict: bool) -> tuple[Tensor, Tensor]:
    """Gathered losses ``[B, S]`` and this rank's predicted ids ``[S/D, B]`` (empty unless ``predict``)."""
    rank, tokens = group_rank(tsp_group), hidden.shape[0]
    if labels.shape != (hidden.shape[1], tokens * group_size(tsp_group)):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)} of a "
                         f"TSP group of {group_size(tsp_group)}: expected [B, S] = "
                         f"[{hidden.shape[1]}, {tokens * group_size(tsp_group)}]")
    local_labels = labels.t()[rank * tokens:(rank + 1) * tokens]  # [S/D, B]
    spec = _VocabSpec(tsp_group=tsp_group, shard_rows=weight.shape[0], shared_weight=shared_weight, predict=predict)
    losses, predicted = TSPVocabLossFunction.apply(hidden, local_labels, spec, weight)
    return _GatherLosses.apply(losses, tsp_group).t().contiguous(), predicted
