"""Zigzag part kernel on NVIDIA GPUs: cuDNN's fused attention (the kernel SDPA's cuDNN backend runs).

On Hopper this is the fastest way to run TSP's chunk shape (../shared/reference/BASELINES.md: a non-causal prefix
call plus a causal diagonal call by cuDNN measured 0.91x the time of TP's square causal call, where SDPA's default
dispatch of the bottom-right-causal chunk measured 1.71x). The aten ops are called directly because the public
``scaled_dot_product_attention`` returns no log-sum-exp, and its backward cannot be run against the *merged*
output and LSE that the part's exact share of the gradient needs (see ``zigzag.py``).

Contract of aten's cuDNN attention in torch 2.11 (schema and meta registration): q ``[b, nq, sq, hd]``,
k/v ``[b, nkv, sk, hd]`` with nkv dividing nq (GQA grouping as Megatron's), strided with a unit last stride;
``compute_log_sumexp=True`` returns the LSE as ``[b, nq, sq, 1]`` fp32; the backward takes it back in that shape
(contiguous) with dropout seed/offset tensors that dropout 0 leaves unused, and no bias (None). ``is_causal`` is
top-left aligned, which is all the zigzag plan needs (its causal parts are square). Checked on an H100
(tests/test_kernels.py, docs/benchmarks.md); :func:`megatron_tsp.kernels.zigzag.default_part_kernel` still
checks it against the exact math kernel on each device before first use (another cuDNN or torch build may
differ).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["backward", "forward", "supports"]

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128  # cuDNN's fused attention (forward and backward) on Ampere and Hopper


def supports(q: Tensor) -> bool:
    """Whether cuDNN's fused attention takes queries like ``q`` (``[b, nq, sq, hd]``)."""
    head_dim = q.shape[-1]
    on_nvidia = q.is_cuda and torch.version.hip is None  # ROCm builds report AMD GPUs as cuda, without cuDNN
    return on_nvidia and q.dtype in _DTYPES and head_dim % 8 == 0 and head_dim <= _MAX_HEAD_DIM


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """:class:`~megatron_tsp.kernels.zigzag.PartKernel` forward: (out ``[b, nq, sq, hd]``, lse ``[b, nq, sq]``)."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.contiguous(), k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.squeeze(-1)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`~megatron_tsp.kernels.zigzag.PartKernel` backward against the merged ``out``/``lse`` of the rows."""
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)
    # cuDNN wants Q, O and dO alike, and a non-contiguous LSE gives wrong grads (a caveat torch's own ring
    # attention notes), so rows must be contiguous: the zigzag functions copy each query chunk's rows once
    # (``contiguous_rows``), which makes these no-ops there (K/V stay views: key ranges of the gathered K/V,
    # unit last stride, as the contract allows).
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out.contiguous(), q.contiguous(), k, v, out.contiguous(), lse.contiguous().unsqueeze(-1),
        no_dropout, no_dropout, None, None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    return grad_q, grad_k, grad_v
