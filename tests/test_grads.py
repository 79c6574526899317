"""Weight gradients leave the TSP Functions in fp32 through Megatron DDP's main_grad contract; the GEMM that
adds a partial into a sum; weight grads computed into fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_tsp import grads
from megatron_tsp.grads import add_linear_, linear_weight_grads, weight_grad_for_autograd
from tests.numerics import TOLERANCE, assert_rel_close, cuda_fp32_gemms_on_cpu, dispatched_overloads


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
    with dispatched_overloads() as dispatched:
        result = add_linear_(total, x, weight)
    assert result is total
    assert_rel_close(total, exact, TOLERANCE[dtype], "sum")
    fused = dtype != torch.bfloat16
    assert (dispatched["aten.addmm.out"] > 0) == fused and (dispatched["aten.mm.default"] > 0) != fused, dispatched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (addmm's out_dtype)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_add_linear_fuses_16_bit_products_into_fp32_on_cuda(dtype: torch.dtype) -> None:
    """On CUDA one addmm adds the 16-bit product into the fp32 sum, more exactly than rounding the product to
    16 bits first (the unfused path's error bounds it)."""
    total, x, weight, exact = _add_linear_case(dtype, "cuda")
    unfused = total.clone().add_(F.linear(x, weight))
    with dispatched_overloads() as dispatched:
        add_linear_(total, x, weight)
    assert dispatched["aten.addmm.dtype_out"] and not dispatched["aten.mm.default"], dispatched
    error, unfused_error = ((t.double().cpu() - exact).abs().max().item() for t in (total, unfused))
    assert error <= unfused_error and error < 1e-4 * exact.abs().max().item(), (error, unfused_error)


def _weight_grads_case(dtype: torch.dtype,
                       device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out ``[6, 2, 40]`` and x ``[6, 2, 24]`` in ``dtype`` and the exact (fp64) weight ``[40, 24]`` and bias
    ``[40]`` grads of ``x @ weight^T + bias``, summed over the 12 tokens."""
    gen = torch.Generator().manual_seed(11)
    grad_out, x = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
                   for shape in ((6, 2, 40), (6, 2, 24)))
    exact_weight = torch.einsum("sbo,sbi->oi", grad_out.double(), x.double())
    return grad_out.to(device), x.to(device), exact_weight, grad_out.double().sum((0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_linear_weight_grads_in_the_accumulation_dtype(dtype: torch.dtype) -> None:
    """Weight and bias grads summed over the tokens, in the dtype asked for (the inputs' by default)."""
    grad_out, x, exact_weight, exact_bias = _weight_grads_case(dtype, "cpu")
    acc = torch.promote_types(dtype, torch.float32)
    for asked, expected in ((None, dtype), (acc, acc)):
        weight, bias = linear_weight_grads(grad_out, x, bias=True, dtype=asked)
        assert weight.dtype == bias.dtype == expected and weight.shape == (40, 24) and bias.shape == (40,)
        assert_rel_close(weight, exact_weight, TOLERANCE[dtype], "weight grad")
        assert_rel_close(bias, exact_bias, TOLERANCE[dtype], "bias grad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (mm's out_dtype)")
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_weight_grads_of_16_bit_inputs_come_out_of_the_gemm_in_fp32_on_cuda(dtype: torch.dtype,
                                                                                  strided: bool) -> None:
    """On CUDA the fp32 weight grad of 16-bit inputs is the GEMM's own fp32 result: far closer to the exact one
    than a 16-bit product cast to fp32 (whose rounding the bound excludes); also for inputs that are strided
    views (``strided``: both as the token-minor transposes of ``[out, S, B]`` / ``[in, S, B]`` tensors)."""
    grad_out, x, exact_weight, _ = _weight_grads_case(dtype, "cuda")
    if strided:
        grad_out, x = (t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in (grad_out, x))
        assert not grad_out.is_contiguous() and not x.is_contiguous()
    (weight,) = linear_weight_grads(grad_out, x, dtype=torch.float32)
    (rounded,) = linear_weight_grads(grad_out, x)
    error, rounded_error = ((t.double().cpu() - exact_weight).abs().max().item() for t in (weight, rounded))
    assert weight.dtype == torch.float32 and error < 1e-4 * exact_weight.abs().max().item() < rounded_error, \
        (error, rounded_error)


def test_16_bit_products_come_out_of_one_gemm_in_fp32_where_the_backend_can() -> None:
    """With kernels for mm's and addmm's ``out_dtype`` (CUDA's, emulated here on CPU) a bf16 weight grad and a
    bf16 product added into an fp32 sum are one GEMM each, in fp32 throughout: no 16-bit product, no cast
    (within fp32's rounding of the exact results, far below bf16's)."""
    grad_out, x, exact_weight, exact_bias = _weight_grads_case(torch.bfloat16, "cpu")
    total, x_rows, weight, exact_sum = _add_linear_case(torch.bfloat16, "cpu")
    with cuda_fp32_gemms_on_cpu():
        with dispatched_overloads() as dispatched:
            weight_grad, bias_grad = linear_weight_grads(grad_out, x, bias=True, dtype=torch.float32)
            add_linear_(total, x_rows, weight)
    assert dispatched["aten.mm.dtype"] == dispatched["aten.addmm.dtype_out"] == 1, dispatched
    assert not dispatched["aten.mm.default"] and not dispatched["aten._to_copy.default"], dispatched
    for result, exact, what in ((weight_grad, exact_weight, "weight grad"), (bias_grad, exact_bias, "bias grad"),
                                (total, exact_sum, "sum")):
        assert result.dtype == torch.float32
        assert_rel_close(result, exact, TOLERANCE[torch.float32], what)


@pytest.mark.parametrize("into_sum", [False, True], ids=["mm", "addmm"])
def test_the_fp32_result_check_asks_the_kernel(into_sum: bool) -> None:
    """The one-time check of a device's 16-bit GEMMs with fp32 results: no kernel (CPU torch) gives False and a
    warning naming the way out, a kernel (CUDA's, emulated) True."""
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="not available on cpu .* unfused"):
        assert not grads._gives_fp32_products(cpu, torch.bfloat16, into_sum)
    with cuda_fp32_gemms_on_cpu():
        assert grads._gives_fp32_products(cpu, torch.bfloat16, into_sum)
