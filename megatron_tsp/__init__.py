"""megatron-tsp: folded tensor and sequence parallelism (TSP) as a Megatron-LM plugin."""

from megatron_tsp.mesh import (
    get_tsp_global_ranks,
    get_tsp_group,
    get_tsp_rank,
    get_tsp_world_size,
    initialize_model_parallel,
)

__all__ = [
    "get_tsp_global_ranks",
    "get_tsp_group",
    "get_tsp_rank",
    "get_tsp_world_size",
    "initialize_model_parallel",
]
