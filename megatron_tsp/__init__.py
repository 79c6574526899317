"""megatron-tsp: folded tensor and sequence parallelism (TSP) as a Megatron-LM plugin.

The mesh API below is resolved on first use (PEP 562), so that importing a submodule does not import Megatron:
the entry points first apply ``megatron_compat.prepare_megatron()``, which must run before Megatron's modules
are imported (on CPU it makes ``torch.compile`` a no-op before Megatron decorates its fused functions).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "get_tsp_global_ranks",
    "get_tsp_group",
    "get_tsp_rank",
    "get_tsp_world_size",
    "initialize_model_parallel",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("megatron_tsp.mesh"), name)
    raise AttributeError(f"module 'megatron_tsp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
