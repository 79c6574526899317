"""Comparison helpers shared by the exactness tests."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative tolerance against a single-device reference, by dtype (fp32/fp64 are the project's bar).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected|, and equal shapes."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert actual.shape == expected.shape and error <= tol * scale, f"{what}: error {error:.3g} vs scale {scale:.3g}"
