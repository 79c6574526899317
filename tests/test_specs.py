"""Megatron integration details of specs.py that the end-to-end runs cannot single out."""

from __future__ import annotations

import torch

from megatron_tsp.attention import rotary_cos_sin
from megatron_tsp.specs import _LOCAL_ROTARY, _local_rotary
from megatron_tsp.zigzag import local_positions


def test_local_rotary_is_made_once_per_angle_table() -> None:
    """The local tokens' RoPE input is the table at their positions (as cos/sin or as angles), reused while
    the table is unchanged (also for the detached alias activation recompute passes), and made again after
    an in-place change, for other positions, or once the table is gone."""
    angles = torch.randn(16, 1, 1, 8)
    positions = local_positions(16, 4, 1)
    cos_sin = _local_rotary(angles, positions, torch.bfloat16, cos_sin=True)
    assert torch.equal(cos_sin, rotary_cos_sin(angles[positions], torch.bfloat16))
    assert _local_rotary(angles, positions, torch.bfloat16, cos_sin=True) is cos_sin
    assert _local_rotary(angles.detach(), positions, torch.bfloat16, cos_sin=True) is cos_sin
    assert torch.equal(_local_rotary(angles, positions, torch.float32, cos_sin=False), angles[positions])
    angles.mul_(2)
    again = _local_rotary(angles, positions, torch.bfloat16, cos_sin=True)
    assert again is not cos_sin and torch.equal(again, rotary_cos_sin(angles[positions], torch.bfloat16))
    other_rank = local_positions(16, 4, 2)
    assert torch.equal(_local_rotary(angles, other_rank, torch.float32, cos_sin=False), angles[other_rank])
    address = angles.data_ptr()
    del angles  # its entry goes with it: a table made later at the same address is not mistaken for it
    assert not any(where[0] == address for where in _LOCAL_ROTARY)
