"""The zigzag core-attention backend against the dense-mask reference: values, grads, memory, layout checks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor

from megatron_tsp.kernels import (
    FUSED_CPU,
    FUSED_CUDNN,
    PART_KERNEL_ENV,
    PartKernel,
    causal_attention,
    cudnn,
    default_part_kernel,
    math_part_kernel,
    ZIGZAG,
    select_core_attention,
    zigzag_causal_attention,
)
from megatron_tsp.kernels.zigzag import _check_against_math
from megatron_tsp.megatron_compat import peak_allocated_bytes
from megatron_tsp.zigzag import gathered_positions, local_positions
from tests.numerics import TOLERANCE, assert_rel_close

KERNELS = ["fused_cpu", "math"]


def _part_kernel(name: str, seq_len: int, tsp_size: int, heads: int) -> PartKernel:
    """The named part kernel; the math one with a tile of half a diagonal part (for :func:`_inputs`' batch
    of 2), so that every part spans several row blocks."""
    chunk = seq_len // (2 * tsp_size)
    return FUSED_CPU if name == "fused_cpu" else math_part_kernel(block_elements=heads * chunk * chunk)


def _inputs(seq_len: int, tsp_size: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int,
            batch: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q ``[S/D, b, nq, 16]``, k/v ``[S, b, nkv, 16]`` (leaves) and an output grad ``[S/D, b, nq*16]``."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 16

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    local_len = seq_len // tsp_size
    q = rand(local_len, batch, heads, head_dim).requires_grad_()
    k = rand(seq_len, batch, kv_heads, head_dim).requires_grad_()
    v = rand(seq_len, batch, kv_heads, head_dim).requires_grad_()
    return q, k, v, rand(local_len, batch, heads * head_dim)


def _output_and_grads(kernel: PartKernel | None, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor,
                      q_positions: Tensor, k_positions: Tensor) -> list[Tensor]:
    """[output, dq, dk, dv] of the zigzag backend (``kernel``) or, for None, of the dense reference."""
    if kernel is None:
        out = causal_attention(q, k, v, q_positions, k_positions, 0.3)
    else:
        out = zigzag_causal_attention(q, k, v, q_positions, k_positions, 0.3, part_kernel=kernel)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seq_len", [24, 1088])  # 1088 at D = 1: chunks of 544 keys, past the CPU kernel's tile
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_dense_reference(kernel: str, seq_len: int, heads: int, kv_heads: int, tsp_size: int,
                                 dtype: torch.dtype) -> None:
    k_positions = gathered_positions(seq_len, tsp_size)
    for rank in range(tsp_size):
        q_positions = local_positions(seq_len, tsp_size, rank)
        q, k, v, grad_out = _inputs(seq_len, tsp_size, heads, kv_heads, dtype, seed=rank)
        expected = _output_and_grads(None, q, k, v, grad_out, q_positions, k_positions)
        part_kernel = _part_kernel(kernel, seq_len, tsp_size, heads)
        actual = _output_and_grads(part_kernel, q, k, v, grad_out, q_positions, k_positions)
        for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected, strict=True):
            assert_rel_close(got, want, TOLERANCE[dtype], f"rank {rank} {name}")


def test_default_backend() -> None:
    assert select_core_attention(config=None, layer_number=1) is ZIGZAG
    assert default_part_kernel(torch.empty(1, 2, 4, 64)) is FUSED_CPU
    # no GPU: the math kernel, also for a dtype and head dim cuDNN would take on one
    assert default_part_kernel(torch.empty(1, 2, 4, 64, dtype=torch.bfloat16, device="meta")) not in (
        FUSED_CPU, FUSED_CUDNN)


def test_part_kernel_check_catches_a_wrong_kernel() -> None:
    """The check run before cuDNN's first use on a device passes a correct low-precision kernel (aten's CPU
    one here), refuses one whose log-sum-exp is off by 0.5 and turns a kernel's failure into the same
    message, naming the way out."""
    cpu = torch.device("cpu")
    with torch.no_grad():  # as in the first forward of a layer under full activation recompute
        assert _check_against_math(FUSED_CPU, "CPU", cpu, torch.bfloat16, 64) < 0.05
    shifted = PartKernel(lambda *args: (lambda out, lse: (out, lse + 0.5))(*FUSED_CPU.forward(*args)),
                         FUSED_CPU.backward)
    with pytest.raises(RuntimeError, match=f"disagrees with the exact math kernel.*{PART_KERNEL_ENV}=math"):
        _check_against_math(shifted, "shifted", cpu, torch.bfloat16, 64)

    def unavailable(*args: object) -> None:
        raise RuntimeError("PyTorch was not compiled with cuDNN Flash Attention enabled!")

    with pytest.raises(RuntimeError, match=f"failed .*not compiled.*{PART_KERNEL_ENV}=math"):
        _check_against_math(PartKernel(unavailable, FUSED_CPU.backward), "missing", cpu, torch.bfloat16, 64)


def test_cudnn_part_kernel_calls_on_meta_tensors() -> None:
    """The aten cuDNN ops take the arguments as the zigzag kernel passes them (GQA; heads-first views of
    sequence-major q and gathered K/V, row slices) and give the PartKernel shapes; numbers need a GPU
    (test_cudnn_part_kernel_matches_reference)."""
    batch, heads, kv_heads, rows, keys, head_dim = 2, 4, 2, 8, 24, 64
    q = torch.empty(2 * rows, batch, heads, head_dim, dtype=torch.bfloat16, device="meta").permute(1, 2, 0, 3)
    q = q[:, :, rows:]
    kv = torch.empty(2 * keys, batch, 2 * kv_heads, head_dim, dtype=torch.bfloat16, device="meta")
    k, v = (t.permute(1, 2, 0, 3)[:, :, keys:] for t in kv.chunk(2, dim=2))
    for causal in (False, True):
        out, lse = cudnn.forward(q, k, v, causal, 0.125)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, q.shape[:-1], torch.float32)
        grads = cudnn.backward(torch.empty_like(out), q, k, v, out, lse, causal, 0.125)
        assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in (q, k, v)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (cuDNN fused attention)")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tsp_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_part_kernel_matches_reference(heads: int, kv_heads: int, tsp_size: int, dtype: torch.dtype,
                                             head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seq_len, device = 2048, torch.device("cuda")
    q_bhsd = torch.empty(1, heads, 1, head_dim, dtype=dtype, device=device)
    assert default_part_kernel(q_bhsd) is FUSED_CUDNN  # after passing the check on this device
    monkeypatch.setenv(PART_KERNEL_ENV, "math")
    assert default_part_kernel(q_bhsd) is not FUSED_CUDNN
    gen = torch.Generator(device).manual_seed(tsp_size)
    q, grad_out = (torch.randn(seq_len // tsp_size, 2, heads, head_dim, generator=gen, device=device)
                   for _ in range(2))
    k, v = torch.randn(2, seq_len, 2, kv_heads, head_dim, generator=gen, device=device)
    k_positions = gathered_positions(seq_len, tsp_size, device)
    for rank in range(tsp_size):
        q_positions = local_positions(seq_len, tsp_size, rank, device)
        results = []
        for kernel, precision in ((None, torch.float32), (FUSED_CUDNN, dtype)):
            inputs = [t.to(precision).requires_grad_() for t in (q, k, v)]
            results.append(_output_and_grads(kernel, *inputs, grad_out.flatten(2).to(precision), q_positions,
                                             k_positions))
        for name, want, got in zip(("output", "dq", "dk", "dv"), *results, strict=True):
            assert_rel_close(got.float(), want, 3e-2, f"rank {rank} {name}")


def test_never_a_dense_mask() -> None:
    """Forward + backward peak of either part kernel stays below half of one [S/D, S] boolean mask, which the
    reference does allocate. K/V (256 KB each) are tiny next to S^2/D here, so a mask-sized tensor would show.
    """
    seq_len, tsp_size, rank = 8192, 2, 1
    q, k, v, grad_out = _inputs(seq_len, tsp_size, 2, 1, torch.float32, seed=0, batch=1)
    q_positions, k_positions = local_positions(seq_len, tsp_size, rank), gathered_positions(seq_len, tsp_size)
    mask_bytes = seq_len // tsp_size * seq_len

    def run(part_kernel: PartKernel | None) -> None:
        _output_and_grads(part_kernel, q, k, v, grad_out, q_positions, k_positions)

    # aten's CPU flash kernel keeps scratch tiles per thread: at 16 threads (a GPU machine's CPU) they alone
    # passed the bound, so measure at the 2 threads of CI
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert peak_allocated_bytes(partial(run, None)) >= mask_bytes  # the measurement sees the reference's mask
        for part_kernel in (FUSED_CPU, math_part_kernel(block_elements=1 << 18)):
            assert peak_allocated_bytes(partial(run, part_kernel)) < mask_bytes // 2
    finally:
        torch.set_num_threads(threads)


def test_rejects_other_layouts() -> None:
    seq_len, tsp_size = 16, 2
    q, k, v, _ = _inputs(seq_len, tsp_size, 4, 2, torch.float64, seed=0)
    q_positions, k_positions = local_positions(seq_len, tsp_size, 1), gathered_positions(seq_len, tsp_size)
    for bad_q, bad_k in ((q_positions.flip(0), k_positions), (q_positions, torch.arange(seq_len)),
                         (q_positions[:-1], k_positions)):
        with pytest.raises(ValueError, match="zigzag"):
            zigzag_causal_attention(q, k, v, bad_q, bad_k, 0.3)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        zigzag_causal_attention(q[:, :, :3], k, v, q_positions, k_positions, 0.3)


def test_layout_checked_once_per_position_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """TSP attention calls the kernel 2D times per layer with the same position tensors; their check (a host
    read, a sync on GPU) runs once, and again only for other tensors or after an in-place change, which is
    still caught."""
    from megatron_tsp.kernels import zigzag as zigzag_kernel

    checks = []
    real = zigzag_kernel.zigzag_permutation
    monkeypatch.setattr(zigzag_kernel, "zigzag_permutation", lambda *args: checks.append(args) or real(*args))
    seq_len, tsp_size = 16, 2
    q, k, v, _ = _inputs(seq_len, tsp_size, 4, 2, torch.float64, seed=0)
    q_positions, k_positions = local_positions(seq_len, tsp_size, 1), gathered_positions(seq_len, tsp_size)
    first = ZIGZAG.forward(q, k, v, q_positions, k_positions, 0.3)
    for _ in range(3):
        torch.testing.assert_close(ZIGZAG.forward(q, k, v, q_positions, k_positions, 0.3), first)
    assert len(checks) == 1
    ZIGZAG.forward(q, k, v, q_positions, gathered_positions(seq_len, tsp_size), 0.3)  # other k positions
    assert len(checks) == 2
    q_positions[:2] = q_positions[:2].flip(0)  # in place: no longer rank 1's zigzag positions
    with pytest.raises(ValueError, match="zigzag"):
        ZIGZAG.forward(q, k, v, q_positions, k_positions, 0.3)


def test_backward_grads_are_copied_then_added_never_partly() -> None:
    """The zigzag backward's bookkeeping: a part's range is copied when unwritten, added when written whole,
    and a range written in part (which the chunk plan's order never produces) is refused, not mis-summed."""
    from megatron_tsp.kernels.zigzag import _Written

    grad = torch.full((1, 1, 8, 1), float("nan"))
    written = _Written()
    written.store(slice(2, 6), (grad, torch.ones(1, 1, 4, 1)))
    written.store(slice(3, 5), (grad, torch.ones(1, 1, 2, 1)))
    assert grad[0, 0, 2:6, 0].tolist() == [1.0, 2.0, 2.0, 1.0]
    assert written.gaps(0, 8) == [slice(0, 2), slice(6, 8)]
    with pytest.raises(RuntimeError, match="written in part"):
        written.store(slice(5, 8), (grad, torch.ones(1, 1, 3, 1)))


def test_chunk_rows_copied_once_for_a_kernel_that_wants_them_contiguous() -> None:
    """With ``contiguous_rows`` (cuDNN's parts) each query chunk's q, out, dO and LSE rows reach every part
    of the chunk contiguous, as the same tensors (one copy per chunk, not per part), with unchanged results."""
    seq_len, tsp_size, rank = 32, 4, 1  # rank 1: both chunks have a prefix and a diagonal part
    math = math_part_kernel()
    seen: dict[str, list[Tensor]] = {"forward": [], "backward": []}

    def forward(q: Tensor, *args: object) -> tuple[Tensor, Tensor]:
        seen["forward"].append(q)
        return math.forward(q, *args)

    def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *args: object) -> tuple[Tensor, Tensor, Tensor]:
        seen["backward"] += [grad_out, q, out, lse]
        return math.backward(grad_out, q, k, v, out, lse, *args)

    q, k, v, grad_out = _inputs(seq_len, tsp_size, 4, 2, torch.float64, seed=3)
    positions = local_positions(seq_len, tsp_size, rank), gathered_positions(seq_len, tsp_size)
    wanting = PartKernel(forward, backward, contiguous_rows=True)
    got = _output_and_grads(wanting, q, k, v, grad_out, *positions)
    for want, result in zip(_output_and_grads(math, q, k, v, grad_out, *positions), got, strict=True):
        assert_rel_close(result, want, TOLERANCE[torch.float64], "contiguous rows")
    assert len(seen["forward"]) == 4 and len(seen["backward"]) == 16  # two chunks of two parts
    assert all(t.is_contiguous() for ts in seen.values() for t in ts)
    for phase, per_part in (("forward", 1), ("backward", 4)):  # a chunk's parts share its row tensors
        first, second = seen[phase][:per_part], seen[phase][per_part:2 * per_part]
        assert all(a is b for a, b in zip(first, second)), phase
