"""Zigzag causal load balance for a sequence sharded over a TSP group of D ranks.

The sequence of length S is cut into 2D chunks of S/(2D) tokens; rank p holds chunks p and 2D-1-p, so every
rank gets the same amount of causal-attention work. Putting a sample into chunk order
``[0, 2D-1, 1, 2D-2, ..., D-1, D]`` makes a contiguous split along the sequence hand each rank its two
chunks. TSP attention gathers K/V chunk-major instead (:func:`gathered_positions`): every rank's second
chunk, then every rank's first chunk, i.e. chunks ``[2D-1, ..., D, 0, 1, ..., D-1]``, in which each causal
part of a query chunk is one contiguous key range (``kernels/zigzag.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_zigzag",
    "gathered_positions",
    "inverse_zigzag_permutation",
    "local_positions",
    "zigzag_batch",
    "zigzag_permutation",
    "zigzag_shift",
]


def check_zigzag(seq_len: int, tsp_size: int) -> None:
    """Raise ``ValueError`` unless the sequence splits into 2*tsp_size equal chunks."""
    if tsp_size < 1:
        raise ValueError(f"TSP size must be >= 1, got {tsp_size}")
    if seq_len % (2 * tsp_size) != 0:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x TSP size = {2 * tsp_size}: the "
                         f"zigzag load balance cuts the sequence into 2D equal chunks; pad or change "
                         f"--seq-length to a multiple of {2 * tsp_size}")


def zigzag_permutation(seq_len: int, tsp_size: int, device: torch.device | str = "cpu") -> Tensor:
    """``perm [S]`` (int64) with ``x[perm]`` in zigzag chunk order; ``perm[i]`` is the natural position of slot i."""
    check_zigzag(seq_len, tsp_size)
    chunks = torch.arange(seq_len, device=device).view(2 * tsp_size, -1)
    first = torch.arange(tsp_size, device=device)
    order = torch.stack([first, 2 * tsp_size - 1 - first], dim=1).flatten()  # [0, 2D-1, 1, 2D-2, ...]
    return chunks[order].flatten()


def inverse_zigzag_permutation(seq_len: int, tsp_size: int, device: torch.device | str = "cpu") -> Tensor:
    """``inv [S]`` with ``x_zigzag[inv] == x``: the zigzag slot of each natural position."""
    perm = zigzag_permutation(seq_len, tsp_size, device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(seq_len, device=device)
    return inverse


def local_positions(seq_len: int, tsp_size: int, rank: int, device: torch.device | str = "cpu") -> Tensor:
    """Global (natural) positions ``[S/D]`` of rank ``rank``'s local tokens, in local order."""
    if not 0 <= rank < tsp_size:
        raise ValueError(f"rank {rank} is outside a TSP group of size {tsp_size}")
    local_len = seq_len // tsp_size
    return zigzag_permutation(seq_len, tsp_size, device)[rank * local_len:(rank + 1) * local_len]


def gathered_positions(seq_len: int, tsp_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Global positions ``[S]`` of a sequence gathered chunk-major (``comm.all_gather_zigzag``): every rank's
    second chunk in rank order (natural chunks 2D-1 down to D), then every rank's first chunk (0 up to D-1).
    """
    check_zigzag(seq_len, tsp_size)
    chunks = torch.arange(seq_len, device=device).view(2 * tsp_size, -1)
    order = torch.cat([torch.arange(2 * tsp_size - 1, tsp_size - 1, -1), torch.arange(tsp_size)]).to(device)
    return chunks[order].flatten()


# Per-token fields of a Megatron GPT micro-batch, each ``[b, s]``.
TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def zigzag_batch(batch: dict[str, Any], tsp_size: int) -> dict[str, Any]:
    """A GPT micro-batch in zigzag chunk order, ready for the contiguous sequence split after the embedding.

    ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` (``[b, s]``) are permuted together, so every
    token-local op and the summed loss are unchanged; ``attention_mask`` becomes None because TSP attention is
    causal by construction at the tokens' global positions. Packed sequences (``cu_seqlens``) are refused.
    """
    if batch.get("cu_seqlens") is not None:
        raise ValueError("TSP does not support packed sequences (cu_seqlens): use --tsp-size 1 for them")
    # Pipeline stages may hold only some fields (Megatron's first stage has no labels, the last no tokens).
    present = {name: batch[name] for name in TOKEN_FIELDS if batch.get(name) is not None}
    if not present:
        return batch
    sample = next(iter(present.values()))
    order = zigzag_permutation(sample.shape[1], tsp_size, sample.device)
    return {**batch, **{name: field[:, order] for name, field in present.items()}, "attention_mask": None}


def zigzag_shift(field: Tensor, shift: int, dim: int, tsp_size: int) -> Tensor:
    """Shift a zigzag-ordered full sequence (``zigzag_batch``'s fields, ``dim`` of length S) by ``shift`` in
    natural order and zero the position that wraps around, as Megatron's multi-token prediction rolls its
    inputs and labels (``shift`` -1: each slot then holds the next token of the sample). Same shape and
    order as ``field``."""
    seq_len = field.shape[dim]
    natural = field.index_select(dim, inverse_zigzag_permutation(seq_len, tsp_size, field.device))
    shifted = torch.roll(natural, shifts=shift, dims=dim)
    shifted.select(dim, shift).fill_(0)
    return shifted.index_select(dim, zigzag_permutation(seq_len, tsp_size, field.device))
