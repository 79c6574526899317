"""TSP command-line flags, ``--config`` files, and validation of a Megatron argument namespace for TSP.

Validation runs on every rank right after argument parsing, before ``torch.distributed`` is initialised, so
a bad configuration fails each rank with the same message instead of hanging a collective. Each message
names the offending flag and the fix.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import yaml

from megatron_tsp.mesh import DEFAULT_ORDER, megatron_order
from megatron_tsp.mlp import MLP_SCHEDULES


OUTPUT_LAYERS = ("vocab-ring", "megatron")  # --tsp-output-layer; the first is the default
AUTO = "auto"  # --tsp-attention-buckets-per-call / --tsp-mlp-schedule: chosen by the cost model at startup


class TSPConfigError(ValueError):
    """A configuration TSP cannot run; the message names the flag and the fix."""


def add_tsp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: adds the TSP flags to Megatron's parser."""
    group = parser.add_argument_group("tsp", "folded tensor and sequence parallelism (megatron-tsp)")
    group.add_argument("--tsp-size", type=int, default=1,
                       help="Degree D of the TSP axis: each rank holds 1/D of the tokens of a sample and 1/D "
                            "of every large weight. Takes the place of --tensor-model-parallel-size.")
    group.add_argument("--tsp-order", type=str, default=DEFAULT_ORDER,
                       help="Rank-mesh order, first name varies fastest (keep tsp first: NVLink-local).")
    group.add_argument("--tsp-expert-ring", action="store_true",
                       help="Shard each MoE expert's weights over the TSP axis (expert-tensor-parallel size = "
                            "--tsp-size) and circulate the shards in a ring, like the dense TSP MLP, while "
                            "dispatched tokens stay on their rank. Without it experts are whole on their "
                            "expert-parallel ranks (expert-tensor-parallel size 1).")
    group.add_argument("--tsp-keep-weight-shards", action="store_true",
                       help="Keep the weight shards each TSP layer fetched in forward until its backward (all D "
                            "shards of a layer per rank) instead of fetching them again: backward moves only "
                            "activations and grads, for W_layer bytes per layer of extra memory.")
    group.add_argument("--tsp-attention-buckets-per-call", type=buckets_per_call_flag, default=1,
                       help="Head buckets per TSP attention call, G (divides --tsp-size): 1 walks the D buckets "
                            "one by one (least memory); larger G runs D/G calls over G buckets each, about G "
                            "times fewer kernels and host operations per attention layer (short sequences are "
                            "launch-bound) for G times larger K/V and weight transients. Same bytes, same math. "
                            "auto: the G (and with --tsp-mlp-schedule auto the MLP schedule) with the lowest "
                            "step time that fits in this GPU's memory by megatron_tsp.cost, as the planner "
                            "picks them; printed at startup.")
    group.add_argument("--tsp-mlp-schedule", choices=(*MLP_SCHEDULES, AUTO), default=MLP_SCHEDULES[0],
                       help="ring: the dense MLP's weight shards circulate (TSP.md), two shards alive at a time; "
                            "gather: every rank all-gathers the layer's MLP weights and runs one fc1 and one "
                            "fc2 GEMM over the whole ffn, about D times fewer kernels and host operations for "
                            "the whole layer's MLP weights (and in backward their grads) held at once. Same "
                            "bytes, same math. MoE experts keep the ring (--tsp-expert-ring). auto: as for "
                            "--tsp-attention-buckets-per-call.")
    group.add_argument("--tsp-output-layer", choices=OUTPUT_LAYERS, default=OUTPUT_LAYERS[0],
                       help="vocab-ring: the output layer and loss circulate the output weight's vocabulary shards "
                            "and each rank scores only its own tokens (never S x V/D logits per rank); megatron: "
                            "Megatron's output layer over all-gathered hidden states (fewer bytes when "
                            "micro-batch x sequence is below about the vocabulary size).")
    group.add_argument("--tsp-report-comm-bytes", action="store_true",
                       help="Count the bytes of every TSP collective during training, and the messages "
                            "carrying them, and print the totals per op (rank 0) when training ends, to check "
                            "against megatron_tsp.cost.")
    return parser


def buckets_per_call_flag(value: str) -> int | str:
    """``--tsp-attention-buckets-per-call``'s type: a positive count, or auto."""
    if value == AUTO:
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a positive count of head buckets, or {AUTO}")
    return int(value)


def config_to_argv(path: str | os.PathLike) -> list[str]:
    """Turn a flat YAML map of Megatron flags (plus ``tsp-size``) into argv.

    Keys are flag names with or without the leading ``--``; ``true`` writes the bare flag, ``false`` and
    ``null`` omit it, a list writes several values.
    """
    text = Path(path).read_text()
    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise TSPConfigError(f"--config {path}: expected a flat map of flag: value, got {type(mapping).__name__}")
    argv: list[str] = []
    for key, value in mapping.items():
        flag = "--" + str(key).lstrip("-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *(str(item) for item in value)]
        elif isinstance(value, dict):
            raise TSPConfigError(f"--config {path}: flag {flag} has a nested map; configs are flat")
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: Sequence[str]) -> list[str]:
    """Replace ``--config FILE`` in argv by the file's flags, placed first so that command-line flags win."""
    argv = list(argv)
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise TSPConfigError("--config needs a YAML file: --config configs/<model>.yaml")
    path = argv[at + 1]
    return config_to_argv(path) + argv[:at] + argv[at + 2:]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TSPConfigError(message)


def validate_tsp_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject every configuration TSP cannot run, naming the flag and the fix. Runs before any collective.

    ``args`` is Megatron's freshly parsed namespace (before Megatron's own validation).
    """
    d = args.tsp_size
    _check(d >= 1, f"--tsp-size {d}: must be a positive integer")
    try:
        megatron_order(args.tsp_order)
    except ValueError as error:
        raise TSPConfigError(str(error)) from None
    pp = args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    _check(world_size % (d * pp * cp) == 0,
           f"world size {world_size} is not divisible by --tsp-size {d} x --pipeline-model-parallel-size {pp}"
           f" x --context-parallel-size {cp} = {d * pp * cp}; launch a multiple of {d * pp * cp} ranks or "
           f"change those sizes (data parallelism takes the remaining factor)")
    ep = args.expert_model_parallel_size
    if ep > 1:
        _check(world_size % (ep * pp) == 0,
               f"world size {world_size} is not divisible by --expert-model-parallel-size {ep} x "
               f"--pipeline-model-parallel-size {pp}; change --expert-model-parallel-size")
    ring = args.tsp_expert_ring
    _check(not ring or d > 1, "--tsp-expert-ring needs --tsp-size > 1 (it shards experts over the TSP axis); "
                              "drop --tsp-expert-ring or raise --tsp-size")
    g = args.tsp_attention_buckets_per_call
    _check(g == AUTO or d % g == 0,
           f"--tsp-attention-buckets-per-call {g} must divide --tsp-size {d}: choose one of "
           f"{[n for n in range(1, d + 1) if d % n == 0]}, or {AUTO}")
    if d == 1:
        return
    if AUTO in (g, args.tsp_mlp_schedule):
        _validate_auto_schedules(args)
    _check(args.tensor_model_parallel_size == 1,
           f"--tsp-size {d} with --tensor-model-parallel-size {args.tensor_model_parallel_size}: TSP takes "
           f"the tensor-parallel slot of the mesh; drop --tensor-model-parallel-size (or set it to 1)")
    _check(cp == 1, f"--context-parallel-size {cp} with --tsp-size {d}: TSP already shards the sequence "
                    f"along its axis; drop --context-parallel-size (or raise --tsp-size instead)")
    heads = args.num_attention_heads
    _check(heads % d == 0, f"--num-attention-heads {heads} is not divisible by --tsp-size {d}: "
                           f"choose a --tsp-size that divides the head count")
    if args.group_query_attention:
        groups = args.num_query_groups
        _check(groups is not None and groups % d == 0,
               f"--num-query-groups {groups} is not divisible by --tsp-size {d}: each TSP rank owns whole "
               f"KV groups; choose a --tsp-size that divides --num-query-groups")
    ffn = args.ffn_hidden_size if args.ffn_hidden_size is not None else 4 * args.hidden_size
    _check(ffn % d == 0, f"--ffn-hidden-size {ffn} is not divisible by --tsp-size {d}: "
                         f"choose an ffn size that is a multiple of {d}")
    # The vocabulary needs no check: Megatron pads it to a multiple of --make-vocab-size-divisible-by x
    # the tensor-parallel size (here D), so the vocab-parallel embedding always splits evenly.
    seq = args.seq_length
    _check(seq is not None and seq % (2 * d) == 0,
           f"--seq-length {seq} is not divisible by 2 x --tsp-size = {2 * d}: zigzag load balancing cuts "
           f"each sample into {2 * d} chunks; use a multiple of {2 * d}")
    _check(args.attention_dropout == 0,
           f"--attention-dropout {args.attention_dropout} is not supported with --tsp-size {d}: the TSP "
           f"attention kernels have no dropout; pass --attention-dropout 0")
    _check(args.position_embedding_type in ("rope", "learned_absolute", "none"),
           f"--position-embedding-type {args.position_embedding_type} is not supported with --tsp-size {d}; "
           f"use rope, learned_absolute or none")
    etp = args.expert_tensor_parallel_size
    if ring:
        _validate_expert_ring(args, world_size)
    else:
        _check(args.num_experts is None or etp in (None, 1),
               f"--expert-tensor-parallel-size {etp} with --tsp-size {d}: experts live on their own "
               f"expert-parallel view of the ranks, unsharded along the TSP axis; use "
               f"--expert-tensor-parallel-size 1, or --tsp-expert-ring to shard them over the TSP axis")
    unsupported = {
        "use_megatron_fsdp": "--use-megatron-fsdp",
        "use_torch_fsdp2": "--use-torch-fsdp2",
        "tp_comm_overlap": "--tp-comm-overlap",
        "reset_attention_mask": "--reset-attention-mask (packed sequences)",
        "multi_latent_attention": "--multi-latent-attention",
        "hybrid_context_parallel": "--hybrid-context-parallel",
        # Attention math Megatron applies inside the attention modules TSP attention replaces: TSP layers
        # would train without it, silently.
        "attention_output_gate": "--attention-output-gate",
        "qk_clip": "--qk-clip",
        "log_max_attention_logit": "--log-max-attention-logit",
        "experimental_attention_variant": "--experimental-attention-variant",
        "linear_attention_freq": "--linear-attention-freq",
        # Transformer Engine's low-precision recipes: TSP layers run their GEMMs in the parameter dtype.
        "fp8": "--fp8-format",
        "fp4": "--fp4-format",
    }
    for attribute, flag in unsupported.items():
        _check(not getattr(args, attribute, None),
               f"{flag} is not supported with --tsp-size {d}; remove it or run with --tsp-size 1")
    _check(getattr(args, "softmax_type", "vanilla") == "vanilla",
           f"--softmax-type {getattr(args, 'softmax_type', None)} (attention sinks) is not supported with "
           f"--tsp-size {d}: the TSP attention kernels compute the plain softmax; use --softmax-type vanilla")
    _check(getattr(args, "window_size", None) is None,
           f"--window-size (sliding-window attention) is not supported with --tsp-size {d}; remove it")
    # CUDA graphs capture a layer's kernels once and replay them without its Python. TSP layers have never
    # been captured (no GPU run of it), and their schedules do host-side work every step (prefetch hand-overs,
    # handing weight grads to DDP through main_grad), so a replay is not known to be the same training.
    graph_flags = {f"--cuda-graph-impl {args.cuda_graph_impl}": args.cuda_graph_impl != "none",
                   "--enable-cuda-graph": args.enable_cuda_graph, "--external-cuda-graph": args.external_cuda_graph}
    for flag, used in graph_flags.items():
        _check(not used, f"{flag} is not supported with --tsp-size {d}: TSP layers have not been validated under "
                         f"CUDA graph capture; remove it or run with --tsp-size 1")


def _validate_auto_schedules(args: argparse.Namespace) -> None:
    """``auto`` schedules are costed by ``megatron_tsp.cost`` at startup: refuse what it does not model."""
    flags = (f"--tsp-attention-buckets-per-call {args.tsp_attention_buckets_per_call} --tsp-mlp-schedule "
             f"{args.tsp_mlp_schedule}")
    fix = "pass both flags explicitly (python -m megatron_tsp.plan compares them)"
    _check(isinstance(args.moe_layer_freq, int),
           f"{flags} with a --moe-layer-freq pattern: the cost model that picks auto schedules takes an integer "
           f"frequency; {fix}")


def _validate_expert_ring(args: argparse.Namespace, world_size: int) -> None:
    """``--tsp-expert-ring``: experts sharded over the TSP axis, i.e. expert-tensor-parallel size D on the
    TSP group's ranks, with local (SequentialMLP) experts and a dispatcher that keeps tokens local."""
    d, ep, pp = args.tsp_size, args.expert_model_parallel_size, args.pipeline_model_parallel_size
    _check(args.num_experts is not None, "--tsp-expert-ring without --num-experts: the ring shards MoE experts; "
                                         "add --num-experts or drop --tsp-expert-ring")
    etp = args.expert_tensor_parallel_size
    _check(etp in (None, d), f"--expert-tensor-parallel-size {etp} with --tsp-expert-ring: the ring shards "
                             f"experts over the TSP axis, so that size is --tsp-size ({d}); drop "
                             f"--expert-tensor-parallel-size")
    expert_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size or 4 * args.hidden_size
    _check(expert_ffn % d == 0, f"--moe-ffn-hidden-size {expert_ffn} is not divisible by --tsp-size {d}: the "
                                f"ring gives each rank 1/{d} of every expert; choose a multiple of {d}")
    _check(world_size % (d * ep * pp) == 0,
           f"world size {world_size} is not divisible by --tsp-size {d} x --expert-model-parallel-size {ep} x "
           f"--pipeline-model-parallel-size {pp}: with --tsp-expert-ring each expert spans {d} TSP ranks; "
           f"lower --expert-model-parallel-size")
    _check(args.moe_token_dispatcher_type in ("alltoall", "allgather"),
           f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type} with --tsp-expert-ring: use "
           f"alltoall or allgather")
    _check(not args.add_bias_linear,
           "--tsp-expert-ring with linear biases: megatron-core 0.19.2 refuses biases in a MoE model whose "
           "experts are tensor-parallel (TransformerConfig: 'Bias in Moe is only supported when ETP==1'); "
           "add --disable-bias-linear or drop --tsp-expert-ring")
    _check(not args.moe_grouped_gemm, "--moe-grouped-gemm with --tsp-expert-ring: the ring runs each local "
                                      "expert's slice itself; drop --moe-grouped-gemm")
    _check(args.tsp_order.lower().startswith("tsp-"),
           f"--tsp-order {args.tsp_order} with --tsp-expert-ring: the experts' tensor-parallel group must be "
           f"the TSP group, which needs tsp first; use --tsp-order {DEFAULT_ORDER}")


def apply_tsp_layout(args: argparse.Namespace) -> None:
    """Map TSP onto Megatron's namespace: the tsp axis is the tensor-parallel slot with sequence parallelism.

    Sequence parallelism is implied (without it the slot's inputs would be replicated and weight-gathering
    layers would double-count their gradients); experts get expert-tensor-parallel size D with
    ``--tsp-expert-ring`` (the ring's shards are Megatron's expert-TP shards), else 1.
    """
    if args.tsp_size == 1:
        return
    args.tensor_model_parallel_size = args.tsp_size
    args.sequence_parallel = True
    if args.tsp_expert_ring:
        args.expert_tensor_parallel_size = args.tsp_size
    elif args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = 1


def configure_tsp(args: argparse.Namespace) -> None:
    """Validate the TSP flags, then map them onto Megatron's namespace; once per namespace.

    Both entry points call this before Megatron's own ``validate_args``: megatron-tsp's ``pretrain_gpt`` and,
    in a patched Megatron-LM checkout, ``validate_args`` itself (so it must be a no-op the second time).
    """
    if getattr(args, "tsp_configured", False):
        return
    validate_tsp_args(args, args.world_size)
    apply_tsp_layout(args)
    args.tsp_configured = True
