"""Handing a weight's gradient back from a TSP autograd Function, Megatron's way.

The schedules accumulate weight gradients in fp32 (``acc``). Returning them in the parameter's dtype would
round a bf16 model's summed gradient to bf16 before Megatron's DDP adds it into its fp32 ``main_grad``.
Megatron's own linears (with gradient-accumulation fusion) avoid that by adding into ``param.main_grad``
themselves, marking ``param.grad_added_to_main_grad`` and giving autograd a placeholder gradient, which
still makes autograd run DDP's grad-ready hook on the main thread. We follow the same contract whenever DDP
manages the parameter (megatron-core 0.19.2: ``DistributedDataParallel`` sets both attributes and resets the
mark when it zeroes the grad buffer).

Also here: :func:`needs_backward`, which decides whether a schedule keeps its activations for backward, and
:func:`linear_backward`, the grads of a linear layer that the schedules differentiate by hand.
"""

from __future__ import annotations

import torch
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
    ``grad_out @ weight`` ``[..., in]`` and [the weight's ``[out, in]``, the bias's ``[out]`` if ``bias``],
    summed over every leading (token) dim."""
    rows = grad_out.flatten(0, -2)
    return grad_out @ weight, [rows.t() @ x.flatten(0, -2), *([rows.sum(0)] if bias else [])]
