"""Weight gradients leave the TSP Functions in fp32 through Megatron DDP's main_grad contract; the GEMM that
adds a partial into a sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_tsp.grads import add_linear_, weight_grad_for_autograd
from tests.numerics import TOLERANCE, assert_rel_close


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


def _add_linear_case(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An fp32 (or fp64) sum ``[6, 2, 40]``, x ``[6, 2, 24]`` and weight ``[40, 24]`` in ``dtype``, and the exact
    (fp64) ``sum + x @ weight^T``."""
    gen = torch.Generator().manual_seed(7)
    total, x, weight = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                        ((6, 2, 40), (6, 2, 24), (40, 24)))
    x, weight = x.to(dtype), weight.to(dtype)
    exact = total + F.linear(x.double(), weight.double())
    acc = torch.promote_types(dtype, torch.float32)
    return total.to(acc).to(device), x.to(device), weight.to(device), exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_add_linear_adds_the_product_into_the_sum(dtype: torch.dtype) -> None:
    """In place, the exact sum up to the dtype's rounding; one GEMM that accumulates (addmm) when the sum has
    the inputs' dtype, a GEMM and an add for 16-bit inputs into fp32 on CPU."""
    total, x, weight, exact = _add_linear_case(dtype, "cpu")
    with FlopCounterMode(display=False) as flops:
        result = add_linear_(total, x, weight)
    assert result is total
    assert_rel_close(total, exact, TOLERANCE[dtype], "sum")
    counted = flops.get_flop_counts()["Global"]
    fused = dtype != torch.bfloat16
    assert (torch.ops.aten.addmm in counted) == fused and (torch.ops.aten.mm in counted) != fused, counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (addmm's out_dtype)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_add_linear_fuses_16_bit_products_into_fp32_on_cuda(dtype: torch.dtype) -> None:
    """On CUDA one addmm adds the 16-bit product into the fp32 sum, more exactly than rounding the product to
    16 bits first (the unfused path's error bounds it)."""
    total, x, weight, exact = _add_linear_case(dtype, "cuda")
    unfused = total.clone().add_(F.linear(x, weight))
    with FlopCounterMode(display=False) as flops:
        add_linear_(total, x, weight)
    assert torch.ops.aten.addmm in flops.get_flop_counts()["Global"]
    error, unfused_error = ((t.double().cpu() - exact).abs().max().item() for t in (total, unfused))
    assert error <= unfused_error and error < 1e-4 * exact.abs().max().item(), (error, unfused_error)
