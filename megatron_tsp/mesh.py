"""The ``tsp`` axis of the rank mesh, its groups and getters.

Design: the tsp axis occupies Megatron's tensor-parallel slot, the innermost (fastest-varying, NVLink-local)
dimension of Megatron's rank mesh, and Megatron runs with sequence parallelism on it. A TSP rank of degree D
owns exactly the weight shard a tensor-parallel rank of degree D owns and exactly the tokens a
sequence-parallel rank owns, so Megatron's own vocab-parallel embedding/output layer, DDP (sharded params
reduced over data-parallel ranks, ``sequence_parallel`` params summed over the axis), grad-norm
de-duplication, distributed optimizer, dist-checkpointing and MoE parallel folding treat TSP shards as TP
shards: a TSP=D checkpoint is a TP=D checkpoint. TSP replaces only how attention and MLP compute. Putting
TSP on the context-parallel slot instead would replicate the embedding and output layer and need custom
data-parallel groups, grad finalisation and checkpoint offsets.

The user-facing order string names the axis ``tsp`` (default ``tsp-cp-ep-dp-pp``; the first name varies
fastest); it is Megatron's order with ``tp`` renamed.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

DEFAULT_ORDER = "tsp-cp-ep-dp-pp"
_AXES = ("tsp", "cp", "ep", "dp", "pp")


def megatron_order(order: str) -> str:
    """Translate a ``tsp``-named order string (e.g. ``tsp-cp-ep-dp-pp``) into Megatron's ``tp`` naming."""
    names = order.lower().split("-")
    if sorted(names) != sorted(_AXES):
        raise ValueError(f"--tsp-order {order!r}: name each of {'-'.join(_AXES)} exactly once, "
                         f"e.g. --tsp-order {DEFAULT_ORDER}")
    return "-".join("tp" if name == "tsp" else name for name in names)


def initialize_model_parallel(
    tsp_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int = 1,
    order: str = DEFAULT_ORDER,
    **megatron_kwargs,
) -> None:
    """Build every process group of the mesh (tsp, cp, ep, dp, pp and Megatron's derived groups).

    Every rank must call this with the same arguments (every rank creates every group in the same order).
    ``expert_tensor_parallel_size`` defaults to 1: experts live on their own expert-parallel view of the
    same ranks (Megatron's parallel folding), unsharded along the tsp axis. Remaining keyword arguments go
    to ``megatron.core.parallel_state.initialize_model_parallel``.
    """
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tsp_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        order=megatron_order(order),
        **megatron_kwargs,
    )


def get_tsp_group() -> dist.ProcessGroup:
    """The calling rank's TSP group (Megatron's tensor-parallel group, which the tsp axis occupies)."""
    return parallel_state.get_tensor_model_parallel_group()


def get_tsp_world_size() -> int:
    """D, the number of ranks in the TSP group.

    The tsp axis is Megatron's tensor-parallel slot: a run at ``--tsp-size 1`` with plain tensor parallelism
    also sees its TP size here, so code that must know whether TSP layers run reads ``args.tsp_size``.
    """
    return parallel_state.get_tensor_model_parallel_world_size()


def get_tsp_rank() -> int:
    """This rank's index p in its TSP group: it owns head bucket / ffn slice p and zigzag chunks p, 2D-1-p."""
    return parallel_state.get_tensor_model_parallel_rank()


def get_tsp_global_ranks() -> list[int]:
    """Global ranks of the TSP group, in group order."""
    return dist.get_process_group_ranks(get_tsp_group())

