"""Megatron integration glue that is not TSP math: the CPU adapter and the one list of Megatron patches."""

import torch

from megatron_tsp.megatron_compat import patches
from megatron_tsp.megatron_compat.cpu import (
    CPU_MEGATRON_FLAGS,
    cuda_to_cpu,
    install_cuda_stand_ins,
    peak_allocated_bytes,
)


def running_on_cpu() -> bool:
    """True when this process has no GPU: Megatron then runs on CPU ranks over gloo."""
    return not torch.cuda.is_available()


def prepare_megatron() -> None:
    """Apply the patches this process needs; call before importing Megatron's model modules."""
    if running_on_cpu():
        install_cuda_stand_ins()
    patches.install(cpu=running_on_cpu())


__all__ = ["CPU_MEGATRON_FLAGS", "cuda_to_cpu", "patches", "peak_allocated_bytes", "prepare_megatron",
           "running_on_cpu"]
