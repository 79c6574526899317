"""Handing a weight's gradient back from a TSP autograd Function, Megatron's way.

The schedules accumulate weight gradients in fp32 (``acc``). Returning them in the parameter's dtype would
round a bf16 model's summed gradient to bf16 before Megatron's DDP adds it into its fp32 ``main_grad``.
Megatron's own linears (with gradient-accumulation fusion) avoid that by adding into ``param.main_grad``
themselves, marking ``param.grad_added_to_main_grad`` and giving autograd a placeholder gradient, which
still makes autograd run DDP's grad-ready hook on the main thread. We follow the same contract whenever DDP
manages the parameter (megatron-core 0.19.2: ``DistributedDataParallel`` sets both attributes and resets the
mark when it zeroes the grad buffer).

Also here: :func:`needs_backward`, which decides whether a schedule keeps its activations for backward,
:func:`linear_backward` / :func:`linear_weight_grads`, the grads of a linear layer that the schedules
differentiate by hand, and :func:`add_linear_`, the GEMM that adds a bucket's or shard's partial into a sum.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def weight_grad_for_autograd(param: Tensor, acc: Tensor) -> Tensor:
    """The gradient to return for ``param`` from ``acc`` (its full gradient, in fp32 or wider).

    Under Megatron's DDP: ``acc`` goes into ``param.main_grad`` and a placeholder is returned (zeros if
    DDP is told to add it anyway via ``zero_out_wgrad``). Otherwise: ``acc`` in the parameter's dtype.
    """
    if getattr(param, "main_grad", None) is None or not hasattr(param, "grad_added_to_main_grad"):
        return acc.to(param.dtype)
    param.main_grad.add_(acc)
    param.grad_added_to_main_grad = True
    make = torch.zeros_like if getattr(param, "zero_out_wgrad", False) else torch.empty_like
    return make(param)


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether a call on these inputs will be differentiated (grad mode on and one of them requires a grad):
    the TSP schedules then keep what their backward needs instead of recomputing it. False inside a
    recompute region's first, gradient-free forward (Megatron's checkpointing)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor,
                    bias: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Grads of ``out = x @ weight^T (+ bias)``, x ``[..., in]``, weight ``[out, in]``: the input's
    ``grad_out @ weight`` ``[..., in]`` and :func:`linear_weight_grads`."""
    return grad_out @ weight, linear_weight_grads(grad_out, x, bias)


def linear_weight_grads(grad_out: Tensor, x: Tensor, bias: bool = False) -> list[Tensor]:
    """[the weight's grad ``[out, in]``, the bias's ``[out]`` if ``bias``] of ``out = x @ weight^T (+ bias)``,
    summed over every leading (token) dim."""
    rows = grad_out.flatten(0, -2)
    return [rows.t() @ x.flatten(0, -2), *([rows.sum(0)] if bias else [])]


_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_FUSED_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}  # checked once per device and input dtype


def _fused_into_fp32(total: Tensor, x: Tensor) -> bool:
    """Whether ``addmm`` with ``out_dtype`` adds ``x.dtype`` products into an fp32 ``total`` on its device:
    CUDA builds of torch >= 2.8 for 16-bit inputs, checked once on a small exact problem (a build without it
    gets the unfused path and one warning, not a failed step)."""
    if not (total.is_cuda and total.dtype == torch.float32 and x.dtype in _FUSED_DTYPES):
        return False
    key = (total.device, x.dtype)
    if key not in _FUSED_WORKS:
        sums = torch.ones(2, 2, device=total.device)
        try:
            ones = torch.ones(2, 3, dtype=x.dtype, device=x.device)
            torch.addmm(sums, ones, ones.t(), out_dtype=torch.float32, out=sums)
            _FUSED_WORKS[key] = bool(torch.equal(sums, torch.full_like(sums, 4.0)))
        except (RuntimeError, TypeError) as error:
            warnings.warn(f"addmm with out_dtype=float32 for {x.dtype} inputs is not available on {total.device} "
                          f"(torch {torch.__version__}: {error}); TSP sums partial products unfused")
            _FUSED_WORKS[key] = False
    return _FUSED_WORKS[key]


def add_linear_(total: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``total += x @ weight^T`` in place and return ``total``: total ``[..., out]`` contiguous, in x's dtype
    or fp32, x ``[..., in]``, weight ``[out, in]``.

    One GEMM that accumulates into ``total`` where the backend has one (``addmm``; 16-bit inputs into an fp32
    sum on CUDA through its ``out_dtype``, which also adds the product before rounding it to 16 bits), else a
    GEMM and an add: the partial sums of the schedules' head buckets and weight shards need no product tensor
    and no second pass over the sum (measured on an H100 for a 16-bit [16384, 512] x [512, 4096] product
    into fp32: 0.28 ms instead of 0.39, docs/benchmarks.md).
    """
    rows, sums = x.reshape(-1, x.shape[-1]), total.view(-1, total.shape[-1])
    if total.dtype == x.dtype:
        torch.addmm(sums, rows, weight.t(), out=sums)
    elif _fused_into_fp32(total, x):
        torch.addmm(sums, rows, weight.t(), out_dtype=torch.float32, out=sums)
    else:
        total.add_(F.linear(x, weight))
    return total
