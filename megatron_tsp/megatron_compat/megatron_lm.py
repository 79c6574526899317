"""The calls a Megatron-LM checkout makes into megatron-tsp once ``patches/`` is applied to it.

megatron-tsp's own entry point (``python -m megatron_tsp.pretrain_gpt``) needs no patch. A user who keeps
Megatron-LM's stock ``pretrain_gpt.py`` applies ``patches/megatron-core-0.19.2.patch`` to the ``megatron``
package that script imports; the patch adds one call to this module at each place TSP must act:

==========================================  =====================================  ========================
Megatron file (megatron-core 0.19.2)        where                                  hook
==========================================  =====================================  ========================
``training/arguments.py``                   ``parse_args``, after extra args       :func:`add_arguments`
``training/arguments.py``                   ``validate_args``, first               :func:`validate`
``training/initialize.py``                  ``_initialize_distributed``            :func:`mesh_order`
``core/utils.py``                           ``get_batch_on_this_cp_rank``, first   :func:`zigzag`
``core/transformer/transformer_block.py``   ``_get_block_submodules``, first       :func:`build_block_spec`
==========================================  =====================================  ========================

With the patch, ``pretrain_gpt.py ... --tsp-size D --spec megatron_tsp.specs get_gpt_decoder_block_tsp_spec``
trains the TSP layout. This route is for GPU runs; CPU ranks over gloo use megatron-tsp's entry point.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from megatron_tsp.args import AUTO, TSPConfigError, add_tsp_args, configure_tsp
from megatron_tsp.megatron_compat import patches
from megatron_tsp.mesh import megatron_order
from megatron_tsp.zigzag import zigzag_batch

TSP_SPEC = ["megatron_tsp.specs", "get_gpt_decoder_block_tsp_spec"]
# Set by validate() for the hooks that run inside megatron.core, which has no args: this process's TSP degree
# and the TSP flags the TSP block spec takes.
_tsp_size = 1
_tsp_spec_options: dict[str, Any] = {}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The TSP flags on Megatron's parser, unless an ``extra_args_provider`` (megatron-tsp's) added them."""
    if "--tsp-size" in parser._option_string_actions:  # argparse keeps no public registry of its flags
        return parser
    return add_tsp_args(parser)


def validate(args: argparse.Namespace) -> None:
    """Check the TSP flags and map TSP onto Megatron's namespace (TP slot := D, sequence parallel on).

    Runs on every rank before any process group exists. Under TSP the decoder must be the TSP block: any
    other spec would run Megatron's own layers on zigzag-ordered tokens. A namespace megatron-tsp's entry
    point has configured already passes through.
    """
    if getattr(args, "tsp_configured", False):
        return
    if args.tsp_size > 1 and args.spec != TSP_SPEC:
        raise TSPConfigError(f"--tsp-size {args.tsp_size} needs the TSP layers: pass --spec {' '.join(TSP_SPEC)}"
                             f" (got --spec {' '.join(args.spec) if args.spec else 'unset'})")
    configure_tsp(args)
    patches.install(cpu=False)  # pg_collection.tsp; the CPU-only patches belong to megatron-tsp's entry point
    global _tsp_size
    _tsp_size = args.tsp_size
    _tsp_spec_options["keep_weight_shards"] = args.tsp_keep_weight_shards
    _tsp_spec_options["attention_buckets_per_call"] = args.tsp_attention_buckets_per_call
    _tsp_spec_options["mlp_schedule"] = args.tsp_mlp_schedule


def mesh_order(args: argparse.Namespace, megatron_default: str) -> str:
    """Megatron's rank-mesh order string: ``--tsp-order`` under TSP, Megatron's own otherwise."""
    return megatron_order(args.tsp_order) if args.tsp_size > 1 else megatron_default


def zigzag(batch: dict[str, Any]) -> dict[str, Any]:
    """The micro-batch in zigzag chunk order under TSP (see ``zigzag.zigzag_batch``); unchanged otherwise."""
    return zigzag_batch(batch, _tsp_size) if _tsp_size > 1 else batch


def _resolve_auto_schedules() -> None:
    """``auto`` TSP schedules, chosen at the first block spec: the first point after validation where the
    process group exists and the vocabulary is padded (``plan.resolve_auto_schedules``)."""
    from megatron.training import get_args

    from megatron_tsp.plan import resolve_auto_schedules

    args = get_args()
    resolve_auto_schedules(args)
    _tsp_spec_options["attention_buckets_per_call"] = args.tsp_attention_buckets_per_call
    _tsp_spec_options["mlp_schedule"] = args.tsp_mlp_schedule


def build_block_spec(config: Any, spec: Any, vp_stage: Optional[int], pp_rank: Optional[int]) -> Any:
    """Call a block-spec function named by ``--spec`` with the stage's config; pass anything else through.

    Megatron's ``--spec`` hands the named object to the model as is; the TSP decoder block depends on the
    pipeline stage (``--moe-layer-freq`` patterns, layer offsets), so ``--spec`` names a function. The TSP
    one also gets the TSP flags it takes (``--tsp-keep-weight-shards``, ``--tsp-attention-buckets-per-call``,
    ``--tsp-mlp-schedule``; ``auto`` ones chosen at the first call, on every rank).
    """
    from megatron_tsp.specs import get_gpt_decoder_block_tsp_spec  # Megatron's model modules are loaded by now

    if AUTO in _tsp_spec_options.values():
        _resolve_auto_schedules()
    if callable(spec) and not isinstance(spec, type):
        options = _tsp_spec_options if spec is get_gpt_decoder_block_tsp_spec else {}
        return spec(config, vp_stage=vp_stage, pp_rank=pp_rank, **options)
    return spec
