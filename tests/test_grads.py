"""Weight gradients leave the TSP Functions in fp32 through Megatron DDP's main_grad contract."""

from __future__ import annotations

import torch

from megatron_tsp.grads import weight_grad_for_autograd


def _ddp_param(dtype: torch.dtype) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(3, 2, dtype=dtype))
    param.main_grad = torch.full((3, 2), 0.5, dtype=torch.float32)  # what DDP attaches
    param.grad_added_to_main_grad = False
    return param


def test_plain_parameter_gets_its_gradient_in_its_dtype() -> None:
    param = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16))
    acc = torch.full((3, 2), 1.0 + 2**-12, dtype=torch.float32)
    grad = weight_grad_for_autograd(param, acc)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, acc.to(torch.bfloat16))


def test_ddp_parameter_accumulates_fp32_into_main_grad() -> None:
    param = _ddp_param(torch.bfloat16)
    acc = torch.full((3, 2), 1.0 + 2**-12, dtype=torch.float32)  # not representable in bf16
    placeholder = weight_grad_for_autograd(param, acc)
    assert placeholder.shape == param.shape and placeholder.dtype == param.dtype
    assert param.grad_added_to_main_grad
    assert torch.equal(param.main_grad, torch.full((3, 2), 1.5 + 2**-12))  # fp32 sum, nothing rounded


def test_zero_out_wgrad_placeholder_is_zero() -> None:
    param = _ddp_param(torch.float32)
    param.zero_out_wgrad = True
    assert torch.equal(weight_grad_for_autograd(param, torch.ones(3, 2)), torch.zeros(3, 2))
