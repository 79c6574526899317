"""Norms for sequence-sharded activations (TSP and Megatron sequence parallelism), in plain torch.

Each TSP rank normalises its own tokens with a replicated weight, so the weight's gradient is a partial sum
over the rank's tokens; tagging the parameters ``sequence_parallel`` makes Megatron's grad finalisation sum
them over the TSP group. Megatron's torch norm wrapper refuses ``sequence_parallel`` (and Apex/TE are
optional), hence this module. Parameter names match ``torch.nn.RMSNorm`` / ``LayerNorm`` so checkpoints stay
interchangeable with Megatron's local spec.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceShardedNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (``config.normalization``) over the last dim of ``[s_local, b, hidden]``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"--normalization {config.normalization} is not supported by TSP layers; "
                             f"use RMSNorm or LayerNorm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        # Zero-centred gamma stores (weight - 1) so that weight decay pulls the scale towards 1.
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.params_dtype
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """This norm with the given parameters (TSP attention applies q/k norms inside its autograd Function)."""
        if self.zero_centered_gamma:
            weight = weight + 1
        shape = (x.shape[-1],)
        if self.rms:
            return F.rms_norm(x, shape, weight, self.eps)
        return F.layer_norm(x, shape, weight, bias, self.eps)
