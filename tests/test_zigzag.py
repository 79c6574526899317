"""Zigzag load balance: chunk ownership, permutation/inverse, and positions against direct construction."""

from __future__ import annotations

import pytest
import torch

from megatron_tsp.zigzag import (
    gathered_positions,
    inverse_zigzag_permutation,
    local_positions,
    zigzag_batch,
    zigzag_permutation,
    zigzag_shift,
)


@pytest.mark.parametrize("tsp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 3])
def test_each_rank_holds_chunks_p_and_mirror(tsp_size: int, chunk: int) -> None:
    seq_len = 2 * tsp_size * chunk
    for rank in range(tsp_size):
        mirror = 2 * tsp_size - 1 - rank
        expected = list(range(rank * chunk, (rank + 1) * chunk)) + list(range(mirror * chunk, (mirror + 1) * chunk))
        assert local_positions(seq_len, tsp_size, rank).tolist() == expected


def test_permutation_is_chunk_order_and_inverse_undoes_it() -> None:
    seq_len, tsp_size = 16, 4  # chunks of 2 in order 0, 7, 1, 6, 2, 5, 3, 4
    perm = zigzag_permutation(seq_len, tsp_size)
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    x = torch.randn(seq_len, 3)
    x_zigzag = x[perm]
    assert torch.equal(x_zigzag[inverse_zigzag_permutation(seq_len, tsp_size)], x)
    # K/V are gathered chunk-major: every rank's second chunk, then every rank's first chunk
    locals_ = [local_positions(seq_len, tsp_size, rank) for rank in range(tsp_size)]
    gathered = torch.cat([local[2:] for local in locals_] + [local[:2] for local in locals_])
    assert torch.equal(gathered, gathered_positions(seq_len, tsp_size))
    assert gathered.tolist() == [14, 15, 12, 13, 10, 11, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7]


def test_causal_work_is_balanced() -> None:
    seq_len, tsp_size = 64, 4
    # keys a query at position t attends to: t + 1; every rank must get the same total
    work = [int((local_positions(seq_len, tsp_size, rank) + 1).sum()) for rank in range(tsp_size)]
    assert len(set(work)) == 1


def test_rejects_sequence_not_divisible_by_2d() -> None:
    with pytest.raises(ValueError, match=r"not divisible by 2 x TSP size = 8"):
        zigzag_permutation(12, 4)
    with pytest.raises(ValueError, match="outside a TSP group"):
        local_positions(16, 4, 4)


def test_batch_fields_move_together_and_the_mask_goes() -> None:
    tokens = torch.arange(2 * 8).view(2, 8)
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": tokens.float(), "position_ids": tokens % 8,
             "attention_mask": torch.ones(2, 1, 8, 8, dtype=torch.bool)}
    permuted = zigzag_batch(batch, tsp_size=2)
    order = [0, 1, 6, 7, 2, 3, 4, 5]  # chunks 0, 3, 1, 2 of 2 tokens
    assert permuted["tokens"].tolist() == tokens[:, order].tolist()
    for name, offset in (("labels", 100), ("loss_mask", 0), ("position_ids", 0)):
        assert (permuted[name] - offset).long().remainder(8).tolist() == [order, order], name
    assert permuted["attention_mask"] is None
    last_stage = zigzag_batch({**batch, "tokens": None}, tsp_size=2)  # a pipeline stage without tokens
    assert last_stage["tokens"] is None and last_stage["labels"].tolist() == permuted["labels"].tolist()
    with pytest.raises(ValueError, match="packed sequences"):
        zigzag_batch({**batch, "cu_seqlens": torch.tensor([0, 8])}, tsp_size=2)


@pytest.mark.parametrize("tsp_size", [1, 2, 4])
def test_shift_runs_in_natural_order(tsp_size: int) -> None:
    """Multi-token prediction's shift of a zigzag-ordered [B, S] field: slot i gets the natural successor of
    the token it holds, and the slot of the sample's last token gets 0 (Megatron's roll without CP)."""
    seq_len = 4 * tsp_size
    tokens = torch.arange(1, 2 * seq_len + 1).view(2, seq_len)  # [B, S], no zeros
    perm = zigzag_permutation(seq_len, tsp_size)
    zigzag = tokens[:, perm]
    expected = torch.cat([tokens[:, 1:], torch.zeros(2, 1, dtype=tokens.dtype)], dim=1)[:, perm]
    assert torch.equal(zigzag_shift(zigzag, -1, -1, tsp_size), expected)
    if tsp_size > 1:  # a plain roll of the zigzag order is not the same
        assert not torch.equal(torch.roll(zigzag, -1, -1), expected)

