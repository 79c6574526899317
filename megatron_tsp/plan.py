"""Pick a parallel layout for a model, a sequence length and a GPU count, from the cost model (``cost.py``).

    python -m megatron_tsp.plan --config configs/X.yaml --seq-length S --gpus N [--gpu h100|h200|mi300x]
        [--micro-batch-size B] [--recompute none|selective|full|auto] [--recompute-modules M ...]
        [--recompute-num-layers N] [--dense-mask-attention] [--tsp-attention-buckets-per-call G|auto]
        [--tsp-mlp-schedule ring|gather|auto] [--plot out.png] [--all]

The model shape, precision, recompute mode, micro and global batch come from the config (flat Megatron
flags, Megatron's defaults where a flag is absent). Every step compared processes the same global batch:
layouts with fewer data-parallel ranks run more micro-batches per step. The recommendation is the layout
that fits in memory with the lowest estimated step time. TSP layouts are costed with every count of head
buckets per attention call G that divides D and with both MLP schedules (the fastest that fits is shown, as
``TSP8 G=8 MLP-gather``) unless the config or ``--tsp-attention-buckets-per-call`` / ``--tsp-mlp-schedule``
fix them.
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megatron_tsp import comm
from megatron_tsp.args import AUTO, OUTPUT_LAYERS, TSPConfigError, buckets_per_call_flag, config_to_argv
from megatron_tsp.cost import (KINDS, RECOMPUTE_MODULES, Hardware, Layout, ModelShape, StepCost, Workload, memory,
                               step_cost)
from megatron_tsp.mlp import MLP_SCHEDULES

GiB = 2**30
# A layout fits if its modelled peak is within this fraction below the GPU's memory: the memory model's error
# against BASELINES.md reaches 3% (8% for TP without SP at 16K).
MEMORY_MARGIN = 0.05
# Step-time estimates this close are a tie (the model's compute time is off by up to 3.4%, BASELINES.md).
TIE = 0.01

# Vendor spec sheets; bandwidths per direction. Memory is the spec sheet's GB (1e9 bytes), some 5% below what
# the GPU reports: that covers the CUDA context, NCCL buffers and allocator fragmentation, which the modelled
# (max_memory_allocated-like) peak does not count.
# H100 and H200 share the GH100 compute die: both use the bf16 matmul rate measured on the H200
# (780-795 TFLOP/s, BASELINES.md) instead of the 989 TFLOP/s peak. MI300X: 1307 TFLOP/s peak scaled by the
# same measured/peak ratio (an assumption); 7 Infinity Fabric links of 64 GB/s, one to each peer, so a
# send uses one link and a collective over n GPUs at most n-1 links. Across nodes: one 400 Gb/s NIC per
# GPU (50 GB/s, an assumption).
_MEASURED_OVER_PEAK = 787 / 989
GPUS = {
    "h100": Hardware("H100 SXM", memory_bytes=80e9, matmul_flops=787e12, node_bandwidth=450e9,
                     peer_bandwidth=450e9, network_bandwidth=50e9),
    "h200": Hardware("H200 SXM", memory_bytes=141e9, matmul_flops=787e12, node_bandwidth=450e9,
                     peer_bandwidth=450e9, network_bandwidth=50e9),
    "mi300x": Hardware("MI300X", memory_bytes=192e9, matmul_flops=1307e12 * _MEASURED_OVER_PEAK,
                       node_bandwidth=7 * 64e9, peer_bandwidth=64e9, network_bandwidth=50e9),
}


def _megatron_flags(argv: Sequence[str], source: str) -> argparse.Namespace:
    """The Megatron flags the cost model needs, with Megatron's defaults; other flags are ignored. Errors
    name ``source`` (the config file)."""
    parser = argparse.ArgumentParser(prog=f"--config {source}", add_help=False)
    for flag in ("--hidden-size", "--num-layers", "--num-attention-heads", "--vocab-size"):
        parser.add_argument(flag, type=int, required=True)
    for flag in ("--num-query-groups", "--kv-channels", "--ffn-hidden-size", "--num-experts",
                 "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size", "--global-batch-size"):
        parser.add_argument(flag, type=int)
    for flag in ("--group-query-attention", "--swiglu", "--add-qkv-bias",
                 "--untie-embeddings-and-output-weights", "--bf16", "--fp16", "--use-distributed-optimizer",
                 "--tsp-keep-weight-shards"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")  # as Megatron's
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-layer-freq", type=int, default=1)
    parser.add_argument("--position-embedding-type", default="learned_absolute")
    parser.add_argument("--rotary-percent", type=float, default=1.0)
    parser.add_argument("--mtp-num-layers", type=int)
    parser.add_argument("--tsp-attention-buckets-per-call", type=buckets_per_call_flag)
    parser.add_argument("--tsp-mlp-schedule", choices=(*MLP_SCHEDULES, AUTO))
    parser.add_argument("--recompute-granularity", choices=("full", "selective"))
    parser.add_argument("--recompute-method", choices=("uniform", "block"))
    parser.add_argument("--recompute-num-layers", type=int)
    parser.add_argument("--recompute-modules", nargs="+", default=["core_attn"])
    parser.add_argument("--tsp-output-layer", choices=OUTPUT_LAYERS, default=OUTPUT_LAYERS[0])
    return parser.parse_known_args(list(argv))[0]


def model_from_flags(flags: argparse.Namespace) -> ModelShape:
    """A :class:`ModelShape` as Megatron would build it from these flags (``_megatron_flags``' namespace or a
    training run's; Megatron's defaults for ffn, kv-channels)."""
    h, heads = flags.hidden_size, flags.num_attention_heads
    ffn = flags.ffn_hidden_size or (int(4 * h * 2 / 3 / 64) * 64 if flags.swiglu else 4 * h)
    experts = flags.num_experts or 0
    return ModelShape(
        hidden=h, layers=flags.num_layers, heads=heads,
        kv_groups=flags.num_query_groups if flags.group_query_attention else heads,
        head_dim=flags.kv_channels or h // heads, ffn=ffn, vocab=flags.vocab_size, gated=flags.swiglu,
        qkv_bias=flags.add_qkv_bias or flags.add_bias_linear, linear_bias=flags.add_bias_linear,
        tied_embeddings=not flags.untie_embeddings_and_output_weights,
        vocab_divisor=flags.make_vocab_size_divisible_by, experts=experts,
        topk=flags.moe_router_topk if experts else 0,
        expert_ffn=(flags.moe_ffn_hidden_size or ffn) if experts else 0,
        shared_expert_ffn=flags.moe_shared_expert_intermediate_size or 0, moe_layer_freq=flags.moe_layer_freq,
        rotary_dim=(int((flags.kv_channels or h // heads) * flags.rotary_percent)
                    if flags.position_embedding_type in ("rope", "yarn", "mrope") else 0),
        mtp_layers=flags.mtp_num_layers or 0)


def workload_from_flags(flags: argparse.Namespace, seq_len: int, dense_mask: bool = False) -> Workload:
    """The :class:`Workload` Megatron's flags describe (``_megatron_flags``' namespace or a training run's, with
    Megatron's names); an ``auto`` TSP schedule is written as G = 1 and the ring (:func:`evaluate` tries the
    others). ValueError for a --recompute-modules entry the cost model does not know."""
    full = flags.recompute_granularity == "full"
    layers, sixteen_bit = flags.recompute_num_layers, flags.bf16 or flags.fp16
    buckets = flags.tsp_attention_buckets_per_call
    return Workload(micro_batch=flags.micro_batch_size, seq_len=seq_len, param_bytes=2 if sixteen_bit else 4,
                    act_bytes=2 if sixteen_bit else 4, recompute=flags.recompute_granularity or "none",
                    recompute_modules=tuple(flags.recompute_modules or ("core_attn",)),
                    # --recompute-method block: the first N layers of a stage; uniform: chunks of N layers
                    recompute_layers=layers if full and flags.recompute_method == "block" else None,
                    recompute_chunk=(layers or 1) if full and flags.recompute_method == "uniform" else 1,
                    distributed_optimizer=flags.use_distributed_optimizer, tsp_dense_mask=dense_mask,
                    tsp_keep_weights=flags.tsp_keep_weight_shards,
                    tsp_buckets_per_call=buckets if isinstance(buckets, int) else 1,
                    tsp_mlp_gather=flags.tsp_mlp_schedule == "gather",
                    tsp_vocab_ring=flags.tsp_output_layer == "vocab-ring")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divides_shapes(model: ModelShape, t: int) -> bool:
    """Heads, kv groups and ffn split evenly over a tensor (or TSP) degree (args.py's checks)."""
    return (model.heads % t == 0 and model.kv_groups % t == 0 and model.ffn % t == 0
            and model.shared_expert_ffn % t == 0)


def candidate_layouts(model: ModelShape, seq_len: int, gpus: int, micro_batch: int, global_batch: int,
                      gpus_per_node: int) -> list[Layout]:
    """Every layout Megatron (and our validation) accepts: degrees divide heads, kv groups, ffn and the
    sequence (2 chunks per rank for zigzag CP/TSP), the tensor/context axes fit in a node, PP divides the
    layers, DP divides the global batch; MoE with TP needs SP (Megatron). EP: the largest divisor of the
    expert count that divides the GPUs of a pipeline stage (spreads expert memory most). MoE under TSP is
    offered both ways: experts whole on EP ranks, and sharded over the TSP axis by the expert ring (EP then
    divides the stage's GPUs / D)."""
    layouts = []
    for kind in KINDS:
        for t in _divisors(gpus):
            for c in _divisors(gpus // t):
                shape_ok = {"TP": c == 1 and (t == 1 or not model.experts),
                            "TP+SP": c == 1 and t > 1 and seq_len % t == 0,
                            "CP": t == 1 and c > 1 and seq_len % (2 * c) == 0,
                            "TPxCP": t > 1 and c > 1 and seq_len % (2 * c * t) == 0,
                            "TSP": c == 1 and t > 1 and seq_len % (2 * t) == 0}[kind]
                if not shape_ok or t * c > gpus_per_node or not _divides_shapes(model, t):
                    continue
                for pp in _divisors(gpus // (t * c)):
                    dp = gpus // (t * c * pp)
                    if model.layers % pp or global_batch % (micro_batch * dp):
                        continue
                    ep = max(e for e in _divisors(model.experts or 1) if (gpus // pp) % e == 0)
                    layouts.append(Layout(kind, tensor=t, context=c, pipeline=pp, data=dp, expert=ep))
                    if kind == "TSP" and model.experts and model.expert_ffn % t == 0:  # --tsp-expert-ring
                        ep = max(e for e in _divisors(model.experts) if (gpus // (pp * t)) % e == 0)
                        layouts.append(Layout(kind, tensor=t, pipeline=pp, data=dp, expert=ep, expert_ring=True))
    return layouts


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    work: Workload
    cost: StepCost
    fits: bool


def schedule_options(work: Workload, layout: Layout, auto_buckets: bool, auto_mlp: bool) -> list[Workload]:
    """The TSP schedules worth costing for ``layout``: attention call sizes (every G dividing D with
    ``auto_buckets``, else ``work``'s) by MLP schedules (ring and gather with ``auto_mlp``, else ``work``'s);
    one (G = 1, the ring: unused) for other layouts."""
    if layout.kind != "TSP":
        return [replace(work, tsp_buckets_per_call=1, tsp_mlp_gather=False)]
    sizes = _divisors(layout.tensor) if auto_buckets else [work.tsp_buckets_per_call]
    gathers = [False, True] if auto_mlp else [work.tsp_mlp_gather]
    return [replace(work, tsp_buckets_per_call=g, tsp_mlp_gather=gather) for g in sizes for gather in gathers]


def recompute_options(model: ModelShape, work: Workload, layout: Layout, budget: float) -> list[Workload]:
    """The recompute modes worth costing for ``layout``: none; selective recompute of the norms, then also of
    the MLPs (dense and MoE); full; and block recompute of the fewest layers per pipeline stage that fits in
    ``budget`` bytes (if any: memory falls as the count grows, so a bisection finds it). Selective recompute
    of core attention saves no memory with a fused kernel (cost.py), so it is left out; so is moe_act, which
    needs Megatron's grouped-GEMM experts."""
    none = replace(work, recompute="none", recompute_layers=None, recompute_chunk=1)
    full = replace(none, recompute="full")
    norms = replace(none, recompute="selective", recompute_modules=("layernorm",))
    mlps = replace(norms, recompute_modules=("layernorm", "mlp", "moe") if model.experts else ("layernorm", "mlp"))
    options = [none, norms, mlps, full]
    counts = range(1, math.ceil(model.layers / layout.pipeline))
    fewest = bisect.bisect_left(counts, True, key=lambda n: memory(model, replace(full, recompute_layers=n),
                                                                     layout).total <= budget)
    if fewest < len(counts):
        options.append(replace(full, recompute_layers=counts[fewest]))
    return options


def evaluate(model: ModelShape, work: Workload, layout: Layout, hw: Hardware, global_batch: int,
             auto_recompute: bool, auto_buckets: bool = False, auto_mlp: bool = False) -> Candidate:
    """Cost one layout; with ``auto_recompute`` (``auto_buckets``, ``auto_mlp``) the fastest of
    :func:`recompute_options` (:func:`schedule_options`) that fits (or, if none fits, the leanest)."""
    microbatches = global_batch // (work.micro_batch * layout.data)
    budget = (1 - MEMORY_MARGIN) * hw.memory_bytes
    trials = [trial for sized in schedule_options(work, layout, auto_buckets, auto_mlp)
              for trial in (recompute_options(model, sized, layout, budget) if auto_recompute else [sized])]
    costed = []
    for trial in trials:
        cost = step_cost(model, trial, layout, hw, microbatches)
        costed.append(Candidate(layout, trial, cost, cost.memory.total <= budget))
    fitting = [c for c in costed if c.fits]
    if not fitting:
        return min(costed, key=lambda c: c.cost.memory.total)
    fastest = min(fitting, key=lambda c: c.cost.step_s)
    # A larger G or gathered MLP weights hold larger transients: they must be faster by more than a tie.
    tied = [c for c in fitting if c.work.recompute_label == fastest.work.recompute_label
            and c.cost.step_s <= (1 + TIE) * fastest.cost.step_s]
    return min(tied, key=lambda c: (c.work.tsp_buckets_per_call, c.work.tsp_mlp_gather))


def plan(model: ModelShape, work: Workload, gpus: int, hw: Hardware, global_batch: int,
         auto_recompute: bool, auto_buckets: bool = False, auto_mlp: bool = False) -> list[Candidate]:
    """All candidate layouts, costed: fitting ones first by step time, then the rest by memory. With a fixed
    G (not ``auto_buckets``) TSP layouts whose D it does not divide are left out (args.py refuses them)."""
    layouts = candidate_layouts(model, work.seq_len, gpus, work.micro_batch, global_batch, hw.gpus_per_node)
    candidates = [evaluate(model, work, layout, hw, global_batch, auto_recompute, auto_buckets, auto_mlp)
                  for layout in layouts
                  if auto_buckets or layout.kind != "TSP" or layout.tensor % work.tsp_buckets_per_call == 0]
    return sorted(candidates, key=lambda c: (not c.fits, c.cost.step_s if c.fits else c.cost.memory.total))


def recommend(fitting: list[Candidate]) -> Candidate:
    """Of the fitting candidates (sorted by step time), the one that sends the fewest bytes among those within
    ``TIE`` of the fastest: its time depends least on the (unmeasured) overlap of communication."""
    tied = [c for c in fitting if c.cost.step_s <= (1 + TIE) * fitting[0].cost.step_s]
    return min(tied, key=lambda c: c.cost.comm_bytes)


_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"))


def _si(value: float, unit: str) -> str:
    """``value`` with an SI prefix and 3 significant digits: 32.5 us, 1.61 MB, 151 GB."""
    if value == 0:
        return f"0 {unit}"
    scale, prefix = next(((scale, prefix) for scale, prefix in _PREFIXES if abs(value) >= scale), (1e-6, "u"))
    return f"{value / scale:.3g} {prefix}{unit}"


def _layout_label(c: Candidate) -> str:
    """The layout's name, with TSP attention's head buckets per call when above one and the gathered MLP
    when chosen (``TSP8 G=8 MLP-gather``)."""
    if c.layout.kind != "TSP":
        return c.layout.name
    g = c.work.tsp_buckets_per_call
    return c.layout.name + (f" G={g}" if g > 1 else "") + (" MLP-gather" if c.work.tsp_mlp_gather else "")


def _row(c: Candidate) -> str:
    cost, fits = c.cost, "yes" if c.fits else "NO"
    return (f"{_layout_label(c):<30} {c.work.recompute_label:<22} {cost.memory.total / GiB:>8.3g} {fits:>4} "
            f"{_si(cost.comm_bytes, 'B'):>11} {_si(cost.compute_s, 's'):>10} {_si(cost.exposed_comm_s, 's'):>12} "
            f"{_si(cost.step_s, 's'):>10}")


def format_report(model: ModelShape, work: Workload, gpus: int, hw: Hardware, global_batch: int,
                  candidates: list[Candidate], max_rows: int | None = 25) -> str:
    """The table (the first ``max_rows`` candidates, all if None) and the recommendation, as the CLI prints."""
    kind = "MoE" if model.experts else "dense"
    lines = [
        f"model: {kind}, h {model.hidden}, {model.layers} layers, {model.heads} heads / {model.kv_groups} kv groups, "
        f"ffn {model.ffn}{' gated' if model.gated else ''}, vocab {model.vocab}"
        + (f", {model.experts} experts top-{model.topk} ffn {model.expert_ffn}" if model.experts else ""),
        f"workload: seq {work.seq_len}, micro-batch {work.micro_batch}, global batch {global_batch}, "
        f"{work.param_bytes}-byte params, {'distributed ' if work.distributed_optimizer else ''}Adam, "
        f"TSP attention kernel: {'dense mask (reference)' if work.tsp_dense_mask else 'zigzag prefix/diagonal'}"
        + (", TSP weight shards kept for backward" if work.tsp_keep_weights else "")
        + f", TSP output layer: {'vocabulary ring' if work.tsp_vocab_ring else 'Megatron'}",
        f"hardware: {gpus} x {hw.name}, {hw.memory_bytes / GiB:.1f} GiB, {hw.matmul_flops / 1e12:.0f} TFLOP/s "
        f"matmul, {hw.node_bandwidth / 1e9:.0f} GB/s in node",
        "",
        f"{'layout':<30} {'recompute':<22} {'GiB/GPU':>8} {'fits':>4} {'sent/GPU':>11} {'compute':>10} "
        f"{'comm+bubble':>12} {'step':>10}",
    ]
    lines += [_row(c) for c in candidates[:max_rows]]
    if any(c.layout.kind == "TSP" and c.work.tsp_buckets_per_call > 1 for c in candidates[:max_rows]):
        lines.append("G: TSP attention's head buckets per call (--tsp-attention-buckets-per-call; 1 when not shown)")
    if any(c.layout.kind == "TSP" and c.work.tsp_mlp_gather for c in candidates[:max_rows]):
        lines.append("MLP-gather: --tsp-mlp-schedule gather (the ring when not shown)")
    if max_rows is not None and len(candidates) > max_rows:
        lines.append(f"... {len(candidates) - max_rows} more (--all shows them)")
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        leanest = min(candidates, key=lambda c: c.cost.memory.total)
        lines.append(f"\nNo layout fits in {hw.memory_bytes / GiB:.1f} GiB; the leanest is {_layout_label(leanest)} "
                     f"at {leanest.cost.memory.total / GiB:.3g} GiB: add GPUs, pipeline stages or recompute.")
        return "\n".join(lines)
    best, cost = recommend(fitting), recommend(fitting).cost
    sent = cost.sent
    fastest = fitting[0]
    why = (f"the lowest estimated step time of the {len(fitting)} layouts that fit" if best is fastest else
           f"within {TIE:.0%} of the fastest ({_layout_label(fastest)}, {_si(fastest.cost.step_s, 's')}: a tie at "
           f"this model's accuracy) that sends the fewest bytes")
    lines += [
        f"\nRecommended: {_layout_label(best)} (recompute {best.work.recompute_label})",
        f"  fits: {cost.memory.total / GiB:.3g} GiB per GPU of {hw.memory_bytes / GiB:.1f} "
        f"({MEMORY_MARGIN:.0%} kept as margin for the model's error)",
        f"  {why}: {_si(cost.step_s, 's')} = {_si(cost.compute_s, 's')} compute + "
        f"{_si(cost.exposed_comm_s, 's')} exposed communication and bubble",
        f"  sent per GPU per step: {_si(sent.total, 'B')} (forward {_si(sent.forward, 'B')}, backward "
        f"{_si(sent.backward, 'B')}, recompute {_si(sent.recompute, 'B')}, grad sync {_si(sent.grad_sync, 'B')})",
    ]
    runner_up = next((c for c in fitting if c is not best), None)
    if runner_up is not None:
        lines.append(f"  next: {_layout_label(runner_up)} at {_si(runner_up.cost.step_s, 's')} "
                     f"({100 * (runner_up.cost.step_s / cost.step_s - 1):+.1f}%), "
                     f"{runner_up.cost.memory.total / GiB:.3g} GiB")
    if best.layout.kind == "TSP" and (best.work.tsp_buckets_per_call > 1 or best.work.tsp_mlp_gather):
        lines.append(f"  flags: --tsp-size {best.layout.tensor} --tsp-attention-buckets-per-call "
                     f"{best.work.tsp_buckets_per_call} --tsp-mlp-schedule "
                     f"{'gather' if best.work.tsp_mlp_gather else 'ring'}, or {AUTO} for both, which makes "
                     f"this choice at startup (host time scaled from operator counts, not yet measured on a GPU)")
    if best.layout.context > 1:
        lines.append("  note: context parallelism needs Transformer Engine's attention (Megatron's local attention "
                     "asserts CP = 1)")
    for kind in ("TP+SP", "TSP"):
        other = next((c for c in fitting if c.layout.kind == kind), None)
        if other is not None and other is not best:
            lines.append(f"Best {kind}: {_layout_label(other)} (recompute {other.work.recompute_label}), "
                         f"{other.cost.memory.total / GiB:.3g} GiB, {_si(other.cost.comm_bytes, 'B')} sent per GPU "
                         f"per step, {_si(other.cost.step_s, 's')}.")
    return "\n".join(lines)


def plot_sequence_sweep(model: ModelShape, work: Workload, gpus: int, hw: Hardware, global_batch: int,
                        path: str) -> None:
    """PNG of memory/GPU and bytes/GPU/step against sequence length for TP+SP and TSP (with the local
    dense-mask kernel and with the zigzag one) at the largest degree both accept (<= GPUs per node; DP takes the
    rest, no PP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    degree = max(t for t in _divisors(min(gpus, hw.gpus_per_node)) if _divides_shapes(model, t))
    lengths = [n for n in (work.seq_len * 2**k // 16 for k in range(9)) if n and n % (2 * degree) == 0]
    dp = gpus // degree
    microbatches = max(1, global_batch // (work.micro_batch * dp))
    figure, (mem_axis, comm_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (("TP+SP", work, "o-", ""), ("TSP", replace(work, tsp_dense_mask=True), "s-", " (dense-mask kernel)"),
              ("TSP", replace(work, tsp_dense_mask=False), "^--", " (zigzag kernel)"))
    for kind, kind_work, style, note in series:
        layout = Layout(kind, tensor=degree, data=dp)
        costs = [step_cost(model, replace(kind_work, seq_len=n), layout, hw, microbatches) for n in lengths]
        mem_axis.plot(lengths, [c.memory.total / GiB for c in costs], style, label=layout.name + note)
        comm_axis.plot(lengths, [c.comm_bytes / 1e9 for c in costs], style, label=layout.name + note)
    mem_axis.axhline(hw.memory_bytes / GiB, color="grey", linestyle="--", label=f"{hw.name} memory")
    for axis, label in ((mem_axis, "peak memory per GPU (GiB)"), (comm_axis, "sent per GPU per step (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"{gpus} x {hw.name}, micro-batch {work.micro_batch}, recompute {work.recompute_label}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def running_hardware() -> Hardware:
    """This process's GPU as a :data:`GPUS` entry, found by its name (H100, H200, MI300X); another GPU is
    costed with the H100's rates and its own memory, CPU ranks (tests, smoke runs) as an H100."""
    if not torch.cuda.is_available():
        return GPUS["h100"]
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    known = next((key for key in GPUS if key.upper() in properties.name.upper()), None)
    return GPUS[known] if known else replace(GPUS["h100"], name=properties.name,
                                             memory_bytes=properties.total_memory)


def choose_tsp_schedules(args: argparse.Namespace, hw: Hardware) -> Candidate:
    """This training run's TSP layout costed on ``hw``, with each of G and the MLP schedule that its flag sets
    to ``auto`` the fastest that fits (:func:`evaluate`, as the planner picks them). ``args``: Megatron's
    validated namespace with the vocabulary padded (``padded_vocab_size``)."""
    d, pp = args.tsp_size, args.pipeline_model_parallel_size
    model = replace(model_from_flags(args), vocab=args.padded_vocab_size)
    layout = Layout("TSP", tensor=d, pipeline=pp, data=args.world_size // (d * pp),
                    expert=args.expert_model_parallel_size, expert_ring=args.tsp_expert_ring)
    return evaluate(model, workload_from_flags(args, args.seq_length), layout, hw, args.global_batch_size,
                    auto_recompute=False, auto_buckets=args.tsp_attention_buckets_per_call == AUTO,
                    auto_mlp=args.tsp_mlp_schedule == AUTO)


def resolve_auto_schedules(args: argparse.Namespace) -> None:
    """Replace ``auto`` in ``--tsp-attention-buckets-per-call`` / ``--tsp-mlp-schedule`` by
    :func:`choose_tsp_schedules`' choice for this GPU, and print it (rank 0).

    Every rank calls this once the default process group exists and Megatron has padded the vocabulary: the
    ranks' choices are compared (one all-reduce), and ranks on different GPU models that chose differently
    all raise :class:`TSPConfigError` instead of running mismatched collectives.
    """
    if AUTO not in (args.tsp_attention_buckets_per_call, args.tsp_mlp_schedule):
        return
    if args.tsp_size == 1:  # no TSP layers: nothing to choose, and every rank knows it
        args.tsp_attention_buckets_per_call, args.tsp_mlp_schedule = 1, MLP_SCHEDULES[0]
        return
    hw = running_hardware()
    chosen = choose_tsp_schedules(args, hw)
    buckets, gather = chosen.work.tsp_buckets_per_call, chosen.work.tsp_mlp_gather
    if not comm.same_on_all_ranks([buckets, gather]):
        raise TSPConfigError("--tsp-attention-buckets-per-call / --tsp-mlp-schedule auto chose differently on "
                             "different ranks (different GPU models); pass both flags explicitly")
    args.tsp_attention_buckets_per_call, args.tsp_mlp_schedule = buckets, "gather" if gather else "ring"
    if args.rank == 0:
        fits = "" if chosen.fits else f", the leanest: none fits in {hw.memory_bytes / GiB:.1f} GiB"
        print(f"> megatron-tsp auto schedules: --tsp-attention-buckets-per-call {buckets} --tsp-mlp-schedule "
              f"{args.tsp_mlp_schedule} (cost model on {hw.name}: {_si(chosen.cost.step_s, 's')} per step, "
              f"{chosen.cost.memory.total / GiB:.3g} GiB per GPU{fits})", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_tsp.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="flat YAML map of Megatron flags (configs/*.yaml)")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--micro-batch-size", type=int, help="overrides the config's")
    parser.add_argument("--recompute", choices=("none", "selective", "full", "auto"),
                        help="overrides the config's --recompute-granularity (and -method); auto: the fastest "
                             "that fits of none, selective recompute of the norms (and of the MLPs), block "
                             "recompute of the fewest layers, full")
    parser.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES,
                        help="with --recompute selective: what it recomputes (Megatron's flag; default: the "
                             "config's, else core_attn)")
    parser.add_argument("--recompute-num-layers", type=int,
                        help="with --recompute full: block recompute of this many layers per pipeline stage "
                             "(--recompute-method block); default: the config's recompute method and layers "
                             "(block, or uniform chunks), else every layer on its own")
    parser.add_argument("--dense-mask-attention", action="store_true",
                        help="cost TSP with the reference dense-mask attention kernel instead of the default "
                             "zigzag prefix/diagonal kernel")
    parser.add_argument("--tsp-keep-weight-shards", action="store_true",
                        help="cost TSP keeping forward's weight shards for backward (also read from the config)")
    parser.add_argument("--tsp-output-layer", choices=OUTPUT_LAYERS,
                        help="cost TSP with this output layer (default: the config's, else vocab-ring)")
    parser.add_argument("--tsp-attention-buckets-per-call", type=buckets_per_call_flag,
                        help="cost TSP with G head buckets per attention call, or auto: every G dividing D "
                             "(default: the config's, else auto)")
    parser.add_argument("--tsp-mlp-schedule", choices=(*MLP_SCHEDULES, AUTO),
                        help="cost TSP's dense MLP by this schedule, or auto: both (default: the config's, else "
                             "auto)")
    parser.add_argument("--plot", help="write a PNG of memory and bytes against sequence length here")
    parser.add_argument("--all", action="store_true", help="print every candidate layout, not the first 25")
    args = parser.parse_args(argv)

    if args.recompute_num_layers is not None and args.recompute != "full":
        parser.error("--recompute-num-layers (block recompute) needs --recompute full")
    if args.recompute_modules is not None and args.recompute != "selective":
        parser.error("--recompute-modules needs --recompute selective")
    flags = _megatron_flags(config_to_argv(args.config), args.config)
    model = model_from_flags(flags)
    # the command line's choices over the config's; the planner's schedules default to auto, training's do not
    flags.micro_batch_size = args.micro_batch_size or flags.micro_batch_size
    if args.recompute is not None:
        flags.recompute_granularity = args.recompute if args.recompute in ("full", "selective") else None
        flags.recompute_method = "block" if args.recompute_num_layers else None
        flags.recompute_num_layers = args.recompute_num_layers
    flags.recompute_modules = args.recompute_modules or flags.recompute_modules
    flags.tsp_keep_weight_shards = args.tsp_keep_weight_shards or flags.tsp_keep_weight_shards
    flags.tsp_output_layer = args.tsp_output_layer or flags.tsp_output_layer
    for name in ("tsp_attention_buckets_per_call", "tsp_mlp_schedule"):
        setattr(flags, name, getattr(args, name) or getattr(flags, name) or AUTO)
    micro_batch = flags.micro_batch_size
    try:
        work = workload_from_flags(flags, args.seq_length, dense_mask=args.dense_mask_attention)
    except ValueError as error:  # the config's --recompute-modules has one the cost model does not know
        parser.error(f"{error} (in {args.config})")
    global_batch = flags.global_batch_size or micro_batch * args.gpus
    hw = GPUS[args.gpu]
    candidates = plan(model, work, args.gpus, hw, global_batch, auto_recompute=args.recompute == "auto",
                      auto_buckets=flags.tsp_attention_buckets_per_call == AUTO,
                      auto_mlp=flags.tsp_mlp_schedule == AUTO)
    if not candidates:
        sys.exit(f"no layout of {args.gpus} GPUs divides this model, sequence {args.seq_length} and global batch "
                 f"{global_batch} (micro-batch {micro_batch})")
    print(format_report(model, work, args.gpus, hw, global_batch, candidates, None if args.all else 25))
    if args.plot:
        plot_sequence_sweep(model, work, args.gpus, hw, global_batch, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
