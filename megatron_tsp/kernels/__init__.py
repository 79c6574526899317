"""Core-attention kernels behind one interface, :class:`CausalAttention`.

A backend takes local queries and (gathered) keys/values together with their global positions and lets a
query attend to every key at a global position <= its own, whatever order the positions come in (zigzag
included). ``local`` is torch SDPA with a boolean mask; another backend (e.g. Transformer Engine) only has
to provide a function with the same signature.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from megatron_tsp.kernels.local import causal_attention

__all__ = ["CausalAttention", "causal_attention", "select_core_attention"]


class CausalAttention(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                 softmax_scale: float) -> Tensor:
        """q ``[sq, b, nq, hd]``, k/v ``[sk, b, nkv, hd]`` (nq a multiple of nkv), positions ``[sq]``/``[sk]``
        -> ``[sq, b, nq*hd]``."""
        ...


def select_core_attention(**megatron_builder_kwargs: object) -> CausalAttention:
    """Megatron's ``core_attention`` builder for TSP layers: the backend for this process.

    Megatron passes its core-attention constructor arguments (config, layer number, mask type, ...); the
    TSP schedule supplies everything the kernel needs per call, so they only matter for choosing a backend.
    The local SDPA backend is the only one so far (a Transformer Engine backend is planned).
    """
    return causal_attention
