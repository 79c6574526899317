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
differentiate by hand, :func:`linear_in`, a product straight out of the GEMM in fp32 where the backend can,
and :func:`add_linear_`, the GEMM that adds a bucket's or shard's partial into a sum.
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


def linear_weight_grads(grad_out: Tensor, x: Tensor, bias: bool = False,
                        dtype: torch.dtype | None = None) -> list[Tensor]:
    """[the weight's grad ``[out, in]``, the bias's ``[out]`` if ``bias``] of ``out = x @ weight^T (+ bias)``,
    summed over every leading (token) dim, in ``dtype`` (default grad_out's; the schedules ask for fp32, the
    dtype they sum 16-bit weights' grads over ranks in: :func:`linear_in`)."""
    rows, inputs = grad_out.flatten(0, -2), x.flatten(0, -2)
    dtype = dtype or rows.dtype
    return [linear_in(rows.t(), inputs.t(), dtype), *([rows.sum(0, dtype=dtype)] if bias else [])]


def linear_in(x: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``x @ weight^T`` ``[..., out]`` in ``dtype``, x ``[..., in]``, weight ``[out, in]``. 16-bit products
    asked for in fp32 come straight out of the GEMM in fp32 where the backend can (``mm``'s ``out_dtype`` on
    CUDA): no 16-bit result rounded and no casting pass over it."""
    if dtype == x.dtype:
        return F.linear(x, weight)
    if _fused_into_fp32(dtype, x):
        rows = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=dtype)
        return rows.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight).to(dtype)


_FUSED_DTYPES = (torch.bfloat16, torch.float16)
# (device, input dtype, into a sum) -> whether its GEMMs give fp32 results of 16-bit products (asked once)
_FUSED_WORKS: dict[tuple[torch.device, torch.dtype, bool], bool] = {}


def _fused_into_fp32(out_dtype: torch.dtype, x: Tensor, into_sum: bool = False) -> bool:
    """Whether ``mm`` (``addmm`` into an fp32 sum with ``into_sum``) with ``out_dtype`` gives fp32 results of
    ``x.dtype`` products on x's device: CUDA builds of torch >= 2.8 for 16-bit inputs (CPU builds have no such
    kernels)."""
    if not (out_dtype == torch.float32 and x.dtype in _FUSED_DTYPES):
        return False
    key = (x.device, x.dtype, into_sum)
    if key not in _FUSED_WORKS:
        _FUSED_WORKS[key] = x.is_cuda and _gives_fp32_products(x.device, x.dtype, into_sum)
    return _FUSED_WORKS[key]


def _gives_fp32_products(device: torch.device, dtype: torch.dtype, into_sum: bool) -> bool:
    """Checked on a small exact problem, with a transposed operand as the schedules pass them; a build without
    the kernel gets the unfused path and one warning, not a failed step."""
    ones = torch.ones(2, 3, dtype=dtype, device=device)
    try:
        if into_sum:  # 1 + 3: [2, 2]
            result = torch.ones(2, 2, device=device)
            torch.addmm(result, ones, ones.t(), out_dtype=torch.float32, out=result)
            expected = 4.0
        else:  # a weight grad's transposed first operand: [3, 3] of 2
            result, expected = torch.mm(ones.t(), ones, out_dtype=torch.float32), 2.0
    except (RuntimeError, TypeError) as error:
        op = "addmm into an fp32 sum" if into_sum else "mm"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__  # torch's lists backends after
        warnings.warn(f"{op} with out_dtype=float32 for {dtype} inputs is not available on {device} (torch "
                      f"{torch.__version__}: {reason}); TSP computes these 16-bit products unfused")
        return False
    return result.dtype == torch.float32 and bool(torch.equal(result, torch.full_like(result, expected)))


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
    elif _fused_into_fp32(total.dtype, x, into_sum=True):
        torch.addmm(sums, rows, weight.t(), out_dtype=torch.float32, out=sums)
    else:
        total.add_(F.linear(x, weight))
    return total
