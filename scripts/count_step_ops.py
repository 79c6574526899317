"""Operators one training step dispatches per transformer layer, and the bytes its memory-bound operators
move: TSP at each head-bucket count per attention call G, and Megatron's TP+SP, on one rank of degree D
(torch's fake process group, as bench_gpu.py).

Each operator that does work is at least one kernel launch on a GPU, where TSP's step is host-bound below
~64K tokens (docs/benchmarks.md), so this count is the host-side cost, and a CPU can take it. Where the GPU
is busy (long sequences), what TSP adds to TP+SP's time is memory-bound work (copies, casts, sums), whose
bytes (inputs and outputs of every operator but GEMMs, fused attention and collectives) a CPU can count too;
they depend on the shapes (``--hidden``, ``--heads``, ``--ffn``, ``--seq``, ``--dtype``), the operator count
does not. bench_gpu.py's model is built with one and with two layers; the difference of their steps' counts
is one layer's (norms, attention, MLP, recompute and grads included). The cost model's host-time scaling
with G (``cost.tsp_host_steps``) is fitted to the operator counts.

``--cuda-gemms`` counts what a CUDA device dispatches where CPU torch has no kernel: 16-bit GEMMs with fp32
results (``device_profile.cuda_fp32_gemms_on_cpu``; the fp32 weight grads and sums of ``--dtype bf16``).

``--time-steps N`` also times N steps of each model (median) and prints the difference per layer: at tiny
shapes (the defaults) that is the eager schedule's own time per layer and step (Python, dispatch and
near-empty kernels, on CPU also the CUDA-to-CPU adapter's hook on every torch call), the host's side of a
GPU step, which is what sets a short sequence's pace on a GPU.

    .venv/bin/python scripts/count_step_ops.py --tsp 8 --buckets-per-call 1,2,4,8
    .venv/bin/python scripts/count_step_ops.py --tsp 8 --buckets-per-call 8 --mlp-schedule gather --time-steps 30
    .venv/bin/python scripts/count_step_ops.py --tsp 8 --hidden 512 --heads 32 --ffn 2048 --seq 16384 --dtype bf16
    .venv/bin/python scripts/count_step_ops.py --tsp 8 --rank 7 --buckets-per-call 8 --mlp-schedule gather \
        --hidden 1024 --heads 8 --ffn 4096 --seq 4096 --dtype bf16 --cuda-gemms
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable

import bench_gpu  # scripts/; sets Megatron up for this device first
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_tsp.megatron_compat import cuda_to_cpu
from megatron_tsp.mesh import initialize_model_parallel
from megatron_tsp.mlp import MLP_SCHEDULES

from device_profile import cuda_fp32_gemms_on_cpu, tally_work  # scripts/


Step = Callable[[], None]


def build_step(args: argparse.Namespace, layout: str, device: torch.device) -> Step:
    """One training step of bench_gpu.py's model for ``args`` (built here), run once as a warm-up."""
    model = bench_gpu.build_model(args, layout, args.seq, device)

    def step() -> None:
        bench_gpu.train_step(model, args, layout, args.seq, device)
    step()
    return step


def median_seconds(steps: list[Step], repeats: int, device: torch.device) -> list[float]:
    """Median wall time of each step over ``repeats`` rounds, the steps taken in turn within a round, so that
    load from other processes hits them alike."""
    seconds: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, times in zip(steps, seconds, strict=True):
            bench_gpu.synchronize(device)
            start = time.perf_counter()
            step()
            bench_gpu.synchronize(device)
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsp", type=int, default=8, help="degree D (the fake group's size)")
    parser.add_argument("--rank", type=int, default=0, help=bench_gpu.RANK_HELP)
    parser.add_argument("--buckets-per-call", default="1", help="comma-separated G values, each dividing D")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, help="default 32 x D")
    parser.add_argument("--heads", type=int, help="default 4 x D")
    parser.add_argument("--ffn", type=int, help="default 64 x D")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--recompute", choices=("full", "none"), default="full")
    parser.add_argument("--mlp-schedule", choices=MLP_SCHEDULES, default=MLP_SCHEDULES[0],
                        help="the TSP MLP's (--tsp-mlp-schedule)")
    parser.add_argument("--time-steps", type=int, default=0, help="also time this many steps (median)")
    parser.add_argument("--cuda-gemms", action="store_true",
                        help="on CPU, dispatch the 16-bit GEMMs with fp32 results a CUDA device runs (emulated)")
    options = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("fake", rank=options.rank, world_size=options.tsp, store=FakeStore())
    initialize_model_parallel(tsp_size=options.tsp, create_gloo_process_groups=False)
    runs = [("tp_sp", 1)] + [("tsp", int(g)) for g in options.buckets_per_call.split(",")]
    d = options.tsp
    hidden, heads, ffn = options.hidden or 32 * d, options.heads or 4 * d, options.ffn or 64 * d
    on_cpu = device.type == "cpu"
    print(f"degree {d} (rank {options.rank}), S {options.seq}, h {hidden}, {heads} heads, ffn {ffn}, "
          f"{options.dtype}, recompute {options.recompute}, TSP MLP {options.mlp_schedule}, on {device}"
          f"{' with CUDA fp32-result GEMMs emulated' if options.cuda_gemms and on_cpu else ''}")
    labels = ["TP+SP" if layout == "tp_sp" else f"TSP G={g}" for layout, g in runs]
    emulated = cuda_fp32_gemms_on_cpu() if options.cuda_gemms and on_cpu else contextlib.nullcontext()
    with cuda_to_cpu() if on_cpu else contextlib.nullcontext(), emulated:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        steps = []  # per run, its one- and two-layer model's step
        for (layout, g), label in zip(runs, labels, strict=True):
            tallies = []
            for layers in (1, 2):
                args = bench_gpu.parse_args(["--dtype", options.dtype, "--tsp", str(d), "--rank",
                                             str(options.rank), "--layers", str(layers),
                                             "--hidden", str(hidden), "--heads", str(heads), "--ffn", str(ffn),
                                             "--vocab", str(64 * d), "--recompute", options.recompute,
                                             "--buckets-per-call", str(g), "--mlp-schedule", options.mlp_schedule])
                args.seq = options.seq
                step = build_step(args, layout, device)
                tallies.append(tally_work(step))
                if options.time_steps:
                    steps.append(step)
            one, two = tallies
            layer_bytes = Counter(two.bytes_by_op)
            layer_bytes.subtract(one.bytes_by_op)
            top = ", ".join(f"{op} {nbytes / 2**20:.1f}" for op, nbytes in layer_bytes.most_common(4))
            print(f"{label:>9}: {two.operators - one.operators} operators per layer ({one.operators} in a one-layer "
                  f"step); memory-bound operators move {(two.memory_bound_bytes - one.memory_bound_bytes) / 2**20:.1f}"
                  f" MiB per layer (MiB: {top})")
        if options.time_steps:
            seconds = median_seconds(steps, options.time_steps, device)
            for label, one, two in zip(labels, seconds[::2], seconds[1::2], strict=True):
                print(f"{label:>9}: {(two - one) * 1e3:.2f} ms per layer and step (median of {options.time_steps} "
                      f"steps, in turn with the others': {one * 1e3:.1f} ms with one layer, {two * 1e3:.1f} with two)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
