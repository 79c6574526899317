"""Per-rank peak memory and step time of one TSP rank at degree D, measured on ONE device.

Method (BASELINES.md): torch's fake process group stands in for the other D-1 ranks, so every collective
is a no-op while every buffer is real; what is measured is one rank's memory and compute (communication
faked), and the FLOP rate achieved (the cost model's executed FLOPs over the step time, against the
device's measured bf16 matmul rate). Each record also carries the cost model's peak for the same run
(``model_peak_GiB``, without optimizer state), to compare with the measured ``peak_GiB`` (on CPU: the
allocator's peak during the warm-up step, from the torch profiler). The model is built by megatron-tsp's own layer spec and output processor
(TSP attention, MLP ring, vocabulary-ring loss), in bf16 with fp32 grad buffers (Megatron DDP) and full
recompute, micro-batch 1: the settings of ``../shared/tools/megatron_tp_baseline.py``, which measures
Megatron's TP+SP the same way. Run both in the same device call so that the ratios compare like with like.

Prints one JSON line per case and writes them all to ``--out``. The numbers of received shards are
garbage under the fake group (nothing is received); shapes, memory and FLOPs are those of a real rank.

    python scripts/bench_gpu.py --seqs 16384,32768,65536,131072 --out $OUT/tsp.json   # the paper's 7B, D=8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_tsp import cost
from megatron_tsp.args import OUTPUT_LAYERS
from megatron_tsp.megatron_compat import peak_allocated_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tsp", type=int, default=8, help="TSP degree D (the fake group's size)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-groups", type=int, help="default: --heads (MHA)")
    parser.add_argument("--ffn", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seqs", default="16384,32768,65536,131072")
    parser.add_argument("--output-layer", choices=OUTPUT_LAYERS, default=OUTPUT_LAYERS[0])
    parser.add_argument("--keep-weight-shards", action="store_true")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", type=Path, help="write the results here (JSON list)")
    return parser.parse_args()


def build_model(args: argparse.Namespace, seq: int, device: torch.device):
    """One TSP rank's GPT (rank 0 of the fake group), wrapped in Megatron DDP with fp32 grad buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_tsp.specs import get_gpt_decoder_block_tsp_spec

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_groups or args.heads, ffn_hidden_size=args.ffn,
        tensor_model_parallel_size=args.tsp, sequence_parallel=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, pipeline_dtype=dtype, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=device.type == "cpu")
    block = get_gpt_decoder_block_tsp_spec(config, keep_weight_shards=args.keep_weight_shards)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=args.vocab, max_sequence_length=seq,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False).to(device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config, ddp_config, model)


def train_step(model, args: argparse.Namespace, seq: int, device: torch.device) -> None:
    from megatron_tsp.specs import tsp_output_loss

    tokens = torch.randint(0, args.vocab, (1, seq), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    processor = tsp_output_loss if args.output_layer == "vocab-ring" else None
    loss = model(tokens, positions, None, labels=tokens, output_processor=processor)
    loss.float().sum().backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, seq: int, device: torch.device) -> dict:
    """One warm-up step, then one timed step with the peak-memory counter reset."""
    record = {"layout": f"tsp{args.tsp}", "seq": seq, "layers": args.layers, "hidden": args.hidden,
              "heads": args.heads, "kv": args.kv_groups or args.heads, "ffn": args.ffn, "vocab": args.vocab,
              "output_layer": args.output_layer, "keep_weight_shards": args.keep_weight_shards,
              "dtype": args.dtype}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    built = []

    def build_and_warm_up() -> None:
        built.append(build_model(args, seq, device))
        train_step(built[0], args, seq, device)

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
        train_step(model, args, seq, device)
        synchronize(device)
        record["step_s"] = time.perf_counter() - start
        record["achieved_TFLOPs"] = step_flops(args, seq) / record["step_s"] / 1e12
        if device.type == "cuda":
            record["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_plus_adam_GiB"] = record["peak_GiB"] + 12 * params / 2**30  # fp32 master + 2 moments
        predicted = cost.memory(*cost_inputs(args, seq))
        record["model_peak_GiB"] = (predicted.total - predicted.optimizer) / 2**30  # cost.py's, without Adam
        del model
    except torch.OutOfMemoryError:
        record["error"] = "OOM"
    return record


def cost_inputs(args: argparse.Namespace, seq: int) -> tuple[cost.ModelShape, cost.Workload, cost.Layout]:
    """This run as the cost model describes it (``megatron_tsp.cost``)."""
    element = 2 if args.dtype == "bf16" else 4
    model = cost.ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_groups=args.kv_groups or args.heads, head_dim=args.hidden // args.heads,
                            ffn=args.ffn, vocab=args.vocab)
    work = cost.Workload(1, seq, param_bytes=element, act_bytes=element, recompute="full",
                         tsp_keep_weights=args.keep_weight_shards, tsp_vocab_ring=args.output_layer == "vocab-ring")
    return model, work, cost.Layout("TSP", tensor=args.tsp)


def step_flops(args: argparse.Namespace, seq: int) -> float:
    """FLOPs the rank executes in one step by the cost model (recomputes included): layers and output layer."""
    model, work, layout = cost_inputs(args, seq)
    layer, output = cost.layer_flops(model, work, layout, moe=False), cost.output_layer_flops(model, work, layout)
    return sum(args.layers * getattr(layer, phase) + getattr(output, phase)
               for phase in ("forward", "backward", "recompute"))


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
    from megatron_tsp.megatron_compat import cuda_to_cpu, prepare_megatron

    prepare_megatron()  # before Megatron's model modules; on CPU (smoke runs) also its torch.cuda stand-ins
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("fake", rank=0, world_size=args.tsp, store=FakeStore())
    from megatron.core import tensor_parallel

    from megatron_tsp.mesh import initialize_model_parallel

    initialize_model_parallel(tsp_size=args.tsp, create_gloo_process_groups=False)
    results = []
    with cuda_to_cpu() if device.type == "cpu" else contextlib.nullcontext():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        for seq in (int(s) for s in args.seqs.split(",")):
            record = measure(args, seq, device)
            print(json.dumps(record), flush=True)
            results.append(record)
    if device.type == "cuda":
        results.append({"matmul_bf16_TFLOPs": matmul_tflops(device), "device": torch.cuda.get_device_name()})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
