"""Core-attention kernels: causal attention by global position (:class:`CausalAttention`, with autograd), and
the forward/backward pair TSP attention runs (:class:`AttentionBackend`).

A backend takes local queries and (gathered) keys/values together with their global positions and lets a
query attend to every key at a global position <= its own. Two local backends:

- ``zigzag_causal_attention`` (default, ``zigzag.py``): TSP's zigzag layout only; each local query chunk is a
  non-causal prefix plus a causal diagonal, merged by log-sum-exp, with an exact custom backward. No
  ``[S/D, S]`` mask, and no work on future keys. Its parts run on aten's fused CPU kernel, cuDNN on NVIDIA
  GPUs (``cudnn.py``), or an exact math kernel.
- ``causal_attention`` (``local.py``): any position order, torch SDPA with a dense boolean ``[S/D, S]``
  mask; the reference the fast path is tested against.

TSP attention calls a backend as an :class:`AttentionBackend`: a forward that also returns what its backward
needs (kept per head bucket, so that backward never recomputes the attention) and that backward. ``ZIGZAG`` is
the zigzag backend's; another backend (e.g. Transformer Engine) provides the same pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    packed_kv,
    zigzag_attention_backward,
    zigzag_attention_forward,
    zigzag_causal_attention,
)

__all__ = [
    "ZIGZAG",
    "AttentionBackend",
    "FUSED_CPU",
    "FUSED_CUDNN",
    "PART_KERNEL_ENV",
    "CausalAttention",
    "PartKernel",
    "causal_attention",
    "default_part_kernel",
    "math_part_kernel",
    "packed_kv",
    "select_core_attention",
    "zigzag_causal_attention",
]


class CausalAttention(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                 softmax_scale: float) -> Tensor:
        """q ``[sq, b, nq, hd]``, k/v ``[sk, b, nkv, hd]`` (nq a multiple of nkv), positions ``[sq]``/``[sk]``
        -> ``[sq, b, nq*hd]``."""
        ...


@dataclass(frozen=True)
class AttentionBackend:
    """Core attention as TSP attention runs it (shapes as in :class:`CausalAttention`).

    ``forward(q, k, v, q_positions, k_positions, softmax_scale) -> (out, *saved)``;
    ``backward(grad_out, q, k, v, out, *saved, q_positions, k_positions, softmax_scale) -> (grad_q, grad_k,
    grad_v)``, with the grads shaped like q, k, v. ``saved`` is what the backward needs besides its inputs
    and the output (for the zigzag backend, the LSE ``[b, nq, sq]``).
    """

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


ZIGZAG = AttentionBackend(zigzag_attention_forward, zigzag_attention_backward)


def select_core_attention(**megatron_builder_kwargs: object) -> AttentionBackend:
    """Megatron's ``core_attention`` builder for TSP layers: the backend for this process.

    Megatron passes its core-attention constructor arguments (config, layer number, mask type, ...); the
    TSP schedule supplies everything the kernel needs per call (always zigzag positions), so they only
    matter for choosing a backend: always the zigzag backend, also where Transformer Engine is installed.
    TE's fused attention runs the same cuDNN kernels the zigzag backend calls through torch on NVIDIA GPUs;
    what it adds, a bottom-right causal mask, would serve a chunk in one call only with its keys in natural
    order, which the chunk-major gathered K/V (read in place) are not for the second chunk (its diagonal
    block comes first), so a TE backend would either copy each call's K/V or run the same split parts.
    """
    return ZIGZAG
