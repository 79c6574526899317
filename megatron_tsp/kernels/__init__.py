"""Core-attention kernels behind one interface, :class:`CausalAttention`.

A backend takes local queries and (gathered) keys/values together with their global positions and lets a
query attend to every key at a global position <= its own. Two local backends:

- ``zigzag_causal_attention`` (default, ``zigzag.py``): TSP's zigzag layout only; each local query chunk is a
  non-causal prefix plus a causal diagonal, merged by log-sum-exp, with an exact custom backward. No
  ``[S/D, S]`` mask, and no work on future keys. Its parts run on aten's fused CPU kernel, cuDNN on NVIDIA
  GPUs (``cudnn.py``), or an exact math kernel.
- ``causal_attention`` (``local.py``): any position order, torch SDPA with a dense boolean ``[S/D, S]``
  mask; the reference the fast path is tested against.

Another backend (e.g. Transformer Engine) only has to provide a function with the same signature.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from megatron_tsp.kernels.local import causal_attention
from megatron_tsp.kernels.zigzag import (
    FUSED_CPU,
    FUSED_CUDNN,
    PART_KERNEL_ENV,
    PartKernel,
    default_part_kernel,
    math_part_kernel,
    zigzag_causal_attention,
)

__all__ = [
    "FUSED_CPU",
    "FUSED_CUDNN",
    "PART_KERNEL_ENV",
    "CausalAttention",
    "PartKernel",
    "causal_attention",
    "default_part_kernel",
    "math_part_kernel",
    "select_core_attention",
    "zigzag_causal_attention",
]


class CausalAttention(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                 softmax_scale: float) -> Tensor:
        """q ``[sq, b, nq, hd]``, k/v ``[sk, b, nkv, hd]`` (nq a multiple of nkv), positions ``[sq]``/``[sk]``
        -> ``[sq, b, nq*hd]``."""
        ...


def select_core_attention(**megatron_builder_kwargs: object) -> CausalAttention:
    """Megatron's ``core_attention`` builder for TSP layers: the backend for this process.

    Megatron passes its core-attention constructor arguments (config, layer number, mask type, ...); the
    TSP schedule supplies everything the kernel needs per call (always zigzag positions), so they only
    matter for choosing a backend: the zigzag backend for now (a Transformer Engine backend is planned).
    """
    return zigzag_causal_attention
