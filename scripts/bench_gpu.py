"""Per-rank peak memory and step time of one TSP rank and one Megatron TP+SP rank at degree D, on ONE device.

Method (BASELINES.md): torch's fake process group stands in for the other D-1 ranks, so every collective
is a no-op while every buffer is real; what is measured is one rank's memory and compute (communication
faked), and the FLOP rate achieved (the cost model's executed FLOPs over the step time, against the
device's measured bf16 matmul rate). Each record also carries the cost model's peak for the same run
(``model_peak_GiB``, without optimizer state), to compare with the measured ``peak_GiB``. On CPU the
measured peak is the allocator's during the warm-up step (torch profiler), and the model's constant
``model_offset_GiB`` (fitted to a GPU's CUDA-context and allocator overheads) is to be subtracted.

Layouts (``--layouts``), both in the same process so that their ratio compares like with like:

- ``tsp``: megatron-tsp's own layer spec and output processor (TSP attention, MLP ring, vocabulary-ring
  loss by default);
- ``tp_sp``: Megatron's own tensor parallelism with sequence parallelism: its local layer spec, with a
  sequence-parallel RMSNorm (Megatron's torch norm refuses SP) and one causal SDPA call over the whole
  sequence as core attention (Megatron's local core attention materialises the ``[S, S]`` scores), and
  Megatron's own output layer and loss. These are the settings of ``../shared/tools/megatron_tp_baseline.py``,
  which measured BASELINES.md's numbers.

Both in bf16 (or fp32) with fp32 grad buffers (Megatron DDP), micro-batch 1, full recompute (BASELINES.md's
setting) unless ``--recompute`` says none or selective (Megatron's ``--recompute-modules``, e.g. layernorm mlp).

Prints one JSON line per case (on a GPU first its measured matmul rate; both layouts per length), then the
TSP / TP+SP ratios per length, rewriting ``--out`` with all of them after each (a run cut short keeps what
it measured); ``--profile`` adds a profile of each case's step on a GPU.
The numbers of received shards are garbage under the fake group (nothing is received); shapes, memory and
FLOPs are those of a real rank, ``--rank`` (default 0; see its help: rank 0's attention runs fewer calls).

    python scripts/bench_gpu.py --seqs 16384,32768,65536,131072 --out $OUT/bench_gpu.json   # the paper's 7B, D=8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from pathlib import Path
from typing import Any

from megatron_tsp.megatron_compat import cuda_to_cpu, peak_allocated_bytes, prepare_megatron

prepare_megatron()  # before Megatron's model modules; on CPU (smoke runs) also its torch.cuda stand-ins

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from megatron_tsp import cost  # noqa: E402
from megatron_tsp.args import OUTPUT_LAYERS  # noqa: E402
from megatron_tsp.mesh import initialize_model_parallel  # noqa: E402
from megatron_tsp.mlp import MLP_SCHEDULES  # noqa: E402
from megatron_tsp.norm import SequenceShardedNorm  # noqa: E402
from megatron_tsp.specs import get_gpt_decoder_block_tsp_spec, tsp_output_loss  # noqa: E402

from device_profile import print_device_profile  # noqa: E402  (scripts/)
from device_report import LAYOUTS, model_inputs  # noqa: E402  (scripts/)

# Megatron's --recompute-modules that apply to this dense GPT (cost.RECOMPUTE_MODULES less the MoE ones)
DENSE_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


RANK_HELP = ("the rank of the fake group this process is (default 0): zigzag gives every TSP rank the same "
             "FLOPs, but rank 0's first query chunk has no keys before it, so its attention runs three part "
             "calls and one merge per query-chunk pair where every other rank runs four and two")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tsp", type=int, default=8, help="TSP degree D (the fake group's size)")
    parser.add_argument("--rank", type=int, default=0, help=RANK_HELP)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-groups", type=int, help="default: --heads (MHA)")
    parser.add_argument("--ffn", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seqs", default="16384,32768,65536,131072")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--output-layer", choices=OUTPUT_LAYERS, default=OUTPUT_LAYERS[0])
    parser.add_argument("--keep-weight-shards", action="store_true")
    parser.add_argument("--buckets-per-call", type=int, default=1,
                        help="TSP attention's head buckets per call (--tsp-attention-buckets-per-call)")
    parser.add_argument("--mlp-schedule", choices=MLP_SCHEDULES, default=MLP_SCHEDULES[0],
                        help="the TSP MLP's (--tsp-mlp-schedule)")
    parser.add_argument("--recompute", choices=("full", "none", "selective"), default="full",
                        help="Megatron's --recompute-granularity (full: --recompute-method uniform)")
    parser.add_argument("--recompute-num-layers", type=int, default=1,
                        help="with --recompute full: layers per uniformly checkpointed chunk")
    parser.add_argument("--recompute-modules", nargs="+", choices=DENSE_RECOMPUTE_MODULES,
                        help="with --recompute selective: Megatron's --recompute-modules (default: core_attn)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", type=Path, help="write the results here (JSON list)")
    parser.add_argument("--profile", action="store_true",
                        help="on a GPU, profile one more step per case: device-busy time and top kernels")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.tsp:
        parser.error(f"--rank {args.rank} must be a rank of the group of --tsp {args.tsp}")
    if args.recompute_modules is not None and args.recompute != "selective":
        parser.error("--recompute-modules needs --recompute selective")
    if args.recompute_num_layers != 1 and args.recompute != "full":
        parser.error("--recompute-num-layers needs --recompute full")
    args.recompute_modules = args.recompute_modules or ["core_attn"]
    args.layouts = args.layouts.split(",")
    unknown = sorted(set(args.layouts) - set(LAYOUTS))
    if unknown:
        parser.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    return args


class CausalSDPA(MegatronModule):
    """TP+SP's core attention: one causal SDPA call over the whole sequence for this rank's heads.

    Megatron's core-attention interface: q ``[s, b, nq, hd]``, k/v ``[s, b, nkv, hd]`` -> ``[s, b, nq*hd]``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, softmax_scale: float | None = None, **unused: Any) -> None:
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                **unused: Any) -> torch.Tensor:
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (query, key, value)), is_causal=True,
                                             scale=self.softmax_scale, enable_gqa=key.shape[2] != query.shape[2])
        return out.permute(2, 0, 1, 3).flatten(2)


def tp_sp_block(config: TransformerConfig) -> TransformerBlockSubmodules:
    """Megatron's local TP+SP layer with a sequence-parallel RMSNorm and :class:`CausalSDPA`."""
    layer = get_gpt_layer_local_submodules()
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceShardedNorm
    layer.self_attention.submodules.core_attention = CausalSDPA
    return TransformerBlockSubmodules(layer_specs=[ModuleSpec(module=TransformerLayer, submodules=layer)]
                                      * config.num_layers, layer_norm=SequenceShardedNorm)


def build_model(args: argparse.Namespace, layout: str, seq: int, device: torch.device) -> DistributedDataParallel:
    """One rank's GPT (``--rank`` of the fake group) in ``layout``, wrapped in Megatron DDP with fp32 grad
    buffers."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_groups or args.heads, ffn_hidden_size=args.ffn,
        tensor_model_parallel_size=args.tsp, sequence_parallel=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, pipeline_dtype=dtype, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        recompute_granularity=None if args.recompute == "none" else args.recompute,
        recompute_modules=args.recompute_modules,
        **({"recompute_method": "uniform", "recompute_num_layers": args.recompute_num_layers}
           if args.recompute == "full" else {}),
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=device.type == "cpu")
    if layout == "tsp":
        block = get_gpt_decoder_block_tsp_spec(config, keep_weight_shards=args.keep_weight_shards,
                                               attention_buckets_per_call=args.buckets_per_call,
                                               mlp_schedule=args.mlp_schedule)
    else:
        block = tp_sp_block(config)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=args.vocab, max_sequence_length=seq,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False).to(device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config, ddp_config, model)


def train_step(model: DistributedDataParallel, args: argparse.Namespace, layout: str, seq: int,
               device: torch.device) -> None:
    tokens = torch.randint(0, args.vocab, (1, seq), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    processor = tsp_output_loss if layout == "tsp" and args.output_layer == "vocab-ring" else None
    loss = model(tokens, positions, None, labels=tokens, output_processor=processor)
    loss.float().sum().backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, layout: str, seq: int, device: torch.device) -> dict:
    """One warm-up step, then one timed step with the peak-memory counter reset."""
    record = run_record(args, layout, seq)
    described = model_inputs(record)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    built = []

    def build_and_warm_up() -> None:
        built.append(build_model(args, layout, seq, device))
        train_step(built[0], args, layout, seq, device)

    try:
        if device.type == "cpu":  # the peak of the warm-up step, which allocates like the timed one
            record["peak_GiB"] = peak_allocated_bytes(build_and_warm_up) / 2**30
        else:
            build_and_warm_up()
        model = built.pop()
        params = sum(p.numel() for p in model.parameters())
        record["params_per_rank"] = params
        synchronize(device)
        model.zero_grad_buffer()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step(model, args, layout, seq, device)
        synchronize(device)
        record["step_s"] = time.perf_counter() - start
        record["achieved_TFLOPs"] = step_flops(*described) / record["step_s"] / 1e12
        if device.type == "cuda":
            record["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_plus_adam_GiB"] = record["peak_GiB"] + 12 * params / 2**30  # fp32 master + 2 moments
        predicted = cost.memory(*described)
        record["model_peak_GiB"] = (predicted.total - predicted.optimizer) / 2**30  # cost.py's, without Adam
        record["model_offset_GiB"] = cost.OFFSET_BYTES / 2**30  # in model_peak_GiB: fitted on a GPU, not on CPU
        if args.profile and device.type == "cuda":
            print_device_profile(f"{layout} S={seq} step", lambda: train_step(model, args, layout, seq, device))
        del model
    except torch.OutOfMemoryError:
        record["error"] = "OOM"
    return record


def run_record(args: argparse.Namespace, layout: str, seq: int) -> dict:
    """This run's fields, which every record carries (``device_report.model_inputs`` reads them back as the
    cost model's description of the run)."""
    chunk = args.recompute_num_layers if args.recompute == "full" else 1
    recompute = cost.Workload(1, seq, recompute=args.recompute, recompute_modules=tuple(args.recompute_modules),
                              recompute_chunk=chunk).recompute_label
    record = {"layout": layout, "D": args.tsp, "seq": seq, "layers": args.layers, "hidden": args.hidden,
              "heads": args.heads, "kv": args.kv_groups or args.heads, "ffn": args.ffn, "vocab": args.vocab,
              "dtype": args.dtype, "recompute": recompute}
    if layout == "tsp":
        record.update(output_layer=args.output_layer, keep_weight_shards=args.keep_weight_shards,
                      buckets_per_call=args.buckets_per_call, mlp_schedule=args.mlp_schedule, rank=args.rank)
    return record


def step_flops(model: cost.ModelShape, work: cost.Workload, kind: cost.Layout) -> float:
    """FLOPs the rank executes in one step by the cost model (recomputes included): layers and output layer."""
    layer, output = cost.layer_flops(model, work, kind, moe=False), cost.output_layer_flops(model, work, kind)
    return sum(model.layers * getattr(layer, phase) + getattr(output, phase)
               for phase in ("forward", "backward", "recompute"))


def ratios(results: list[dict]) -> list[dict]:
    """TSP over TP+SP, per sequence length measured in both layouts without error: peak memory (with and
    without Adam state) and step time."""
    by_case = {(r["layout"], r["seq"]): r for r in results if "layout" in r and "error" not in r}
    rows = []
    for (layout, seq), tsp in by_case.items():
        tp_sp = by_case.get(("tp_sp", seq))
        if layout == "tsp" and tp_sp is not None:
            rows.append({"seq": seq, **{f"tsp_over_tp_sp_{key}": tsp[key] / tp_sp[key]
                                        for key in ("peak_GiB", "peak_plus_adam_GiB", "step_s")}})
    return rows


def matmul_tflops(device: torch.device) -> float:
    """This device's bf16 8192^3 matmul rate, TFLOP/s (the bar for the achieved rate)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> None:
    args = parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("fake", rank=args.rank, world_size=args.tsp, store=FakeStore())
    initialize_model_parallel(tsp_size=args.tsp, create_gloo_process_groups=False)
    results = []
    if device.type == "cuda":
        report(results, {"matmul_bf16_TFLOPs": matmul_tflops(device), "device": torch.cuda.get_device_name()},
               args.out)
    with cuda_to_cpu() if device.type == "cpu" else contextlib.nullcontext():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        for seq in (int(s) for s in args.seqs.split(",")):  # both layouts per length: a cut run keeps pairs
            for layout in args.layouts:
                report(results, measure(args, layout, seq, device), args.out)
    for row in ratios(results):
        report(results, row, args.out)


def report(results: list[dict], record: dict, out: Path | None) -> None:
    """Print ``record`` and rewrite ``out`` with every record so far (a run cut short keeps what it measured)."""
    print(json.dumps(record), flush=True)
    results.append(record)
    if out:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
