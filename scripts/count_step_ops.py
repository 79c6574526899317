"""Operators one training step dispatches per transformer layer: TSP at each head-bucket count per attention
call G, and Megatron's TP+SP, on one rank of degree D (torch's fake process group, as bench_gpu.py).

Each operator that does work is at least one kernel launch on a GPU, where TSP's step is host-bound below
~64K tokens (docs/benchmarks.md), so this count is the host-side cost, and a CPU can take it. bench_gpu.py's
model is built with one and with two layers; the difference of their steps' counts is one layer's (norms,
attention, MLP, recompute and grads included). The cost model's host-time scaling with G
(``cost.tsp_host_steps``) is fitted to these counts.

    .venv/bin/python scripts/count_step_ops.py --tsp 8 --buckets-per-call 1,2,4,8
"""

from __future__ import annotations

import argparse
import contextlib

import bench_gpu  # scripts/; sets Megatron up for this device first
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_tsp.megatron_compat import cuda_to_cpu
from megatron_tsp.mesh import initialize_model_parallel
from megatron_tsp.mlp import MLP_SCHEDULES

from device_profile import count_work_ops  # scripts/


def step_ops(args: argparse.Namespace, layout: str, device: torch.device) -> int:
    """Operators of one training step after a warm-up step."""
    model = bench_gpu.build_model(args, layout, args.seq, device)
    bench_gpu.train_step(model, args, layout, args.seq, device)
    return count_work_ops(lambda: bench_gpu.train_step(model, args, layout, args.seq, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsp", type=int, default=8, help="degree D (the fake group's size)")
    parser.add_argument("--buckets-per-call", default="1", help="comma-separated G values, each dividing D")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--recompute", choices=("full", "none"), default="full")
    parser.add_argument("--mlp-schedule", choices=MLP_SCHEDULES, default=MLP_SCHEDULES[0],
                        help="the TSP MLP's (--tsp-mlp-schedule)")
    options = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("fake", rank=0, world_size=options.tsp, store=FakeStore())
    initialize_model_parallel(tsp_size=options.tsp, create_gloo_process_groups=False)
    runs = [("tp_sp", 1)] + [("tsp", int(g)) for g in options.buckets_per_call.split(",")]
    print(f"degree {options.tsp}, S {options.seq}, recompute {options.recompute}, TSP MLP "
          f"{options.mlp_schedule}, on {device}")
    with cuda_to_cpu() if device.type == "cpu" else contextlib.nullcontext():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        for layout, g in runs:
            counts = []
            for layers in (1, 2):  # small widths: the count does not depend on them
                args = bench_gpu.parse_args(["--dtype", "fp32", "--tsp", str(options.tsp), "--layers", str(layers),
                                             "--hidden", str(32 * options.tsp), "--heads", str(4 * options.tsp),
                                             "--ffn", str(64 * options.tsp), "--vocab", str(64 * options.tsp),
                                             "--recompute", options.recompute, "--buckets-per-call", str(g),
                                             "--mlp-schedule", options.mlp_schedule])
                args.seq = options.seq
                counts.append(step_ops(args, layout, device))
            label = "TP+SP" if layout == "tp_sp" else f"TSP G={g}"
            print(f"{label:>9}: {counts[1] - counts[0]} operators per layer ({counts[0]} in a one-layer step)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
