"""A column-parallel linear on a TSP rank's own tokens, by gathered weights: multi-token prediction's input
projection ``eh_proj`` (``specs.TSPMultiTokenPredictionLayer``).

Rank p holds rows ``[p*n/D, (p+1)*n/D)`` of the ``[n, k]`` weight (Megatron's column-parallel shard) and its
tokens ``x [S/D, B, k]``. Forward all-gathers the weight (rank order is the full weight) and applies it to
the local tokens: ``[S/D, B, n]``, no activation gathered. Backward gathers the weight again for the input
grad and reduce-scatters the full weight grad (fp32 for 16-bit weights) to the owners, the reduce in flight
while the input grad computes. Bytes per rank per micro-batch: forward all_gather W*e*(D-1)/D, backward
all_gather W*e*(D-1)/D and reduce_scatter W*e_acc*(D-1)/D, W = n*k, where Megatron's sequence-parallel
linear gathers the ``[S, B, k]`` input (and, in ``eh_proj``'s case, its ``[S, B, n]`` output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import all_gather_seq, reduce_scatter_seq
from megatron_tsp.grads import linear_weight_grads, weight_grad_for_autograd

__all__ = ["tsp_gathered_linear"]


class _GatheredLinearFunction(torch.autograd.Function):
    """x ``[..., k]`` @ the gathered weight ``[n, k]``^T; inputs x, this rank's weight shard ``[n/D, k]``, group."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return F.linear(x, all_gather_seq(weight, group).wait())

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        full = all_gather_seq(weight, ctx.group)  # in flight during the weight grad's GEMM
        (grad_full,) = linear_weight_grads(grad_out, x, dtype=torch.promote_types(weight.dtype, torch.float32))
        own_grad = reduce_scatter_seq(grad_full, ctx.group)
        grad_x = grad_out @ full.wait()  # the reduce in flight meanwhile
        return grad_x, weight_grad_for_autograd(weight, own_grad.wait()), None


def tsp_gathered_linear(x: Tensor, weight: Tensor, tsp_group: dist.ProcessGroup) -> Tensor:
    """``x @ W^T`` for the rank's tokens x ``[S/D, B, k]`` and its column-parallel shard ``weight [n/D, k]`` of
    W ``[n, k]`` (no bias): ``[S/D, B, n]``; the weight grad goes to the shard (Megatron's main_grad under DDP)."""
    return _GatheredLinearFunction.apply(x, weight, tsp_group)
