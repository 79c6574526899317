"""Time TSP's two layer schedules, attention and the MLP ring, forward and backward, on one rank of degree D.

Torch's fake process group stands in for the other D-1 ranks (as in bench_gpu.py: every buffer is real,
communication is faked), so the times are the rank's compute. A layer's backward does exactly two
forwards' worth of GEMMs (TSP keeps its GEMM outputs; tests/test_attention.py and test_mlp.py count them),
so the MLP's backward / forward ratio is about 2; attention's also holds its kernel's backward, which
recomputes the scores (about 2.5 forwards). Prints the median of each, run on CPU or a GPU, the
operators that do work each dispatches (each at least one kernel launch on a GPU, where TSP's schedules are
host-bound at short sequences: docs/benchmarks.md), the Python function calls a forward and backward makes
(the host's other cost there, deterministic on any device) and the peak memory a forward and backward
allocates above what was allocated before it (the input, weights and their grads already there):

    .venv/bin/python scripts/bench_layer.py --tsp 4 --seq 8192 --hidden 1024 --heads 16 --ffn 4096

``--buckets-per-call 1,4`` times attention once per listed G (head buckets per attention call),
``--mlp-schedules ring,gather`` the MLP once per listed schedule.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_tsp.attention import tsp_attention
from megatron_tsp.megatron_compat import peak_allocated_bytes
from megatron_tsp.mlp import tsp_mlp
from megatron_tsp.zigzag import gathered_positions, local_positions

from device_profile import print_device_profile, tally_work  # scripts/


def _seconds(run: Callable[[], Tensor], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (forward, backward) seconds of ``run`` and its backward, after one warm-up call."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    forward, backward = [], []
    for _ in range(repeats + 1):
        start = now()
        out = run()
        middle = now()
        out.backward(torch.ones_like(out))
        forward.append(middle - start)
        backward.append(now() - middle)
    return statistics.median(forward[1:]), statistics.median(backward[1:])


def _forward_backward(run: Callable[[], Tensor]) -> None:
    out = run()
    out.backward(torch.ones_like(out))


def _python_calls(run: Callable[[], Tensor]) -> int:
    """Python function calls (torch's Python layers and ours, builtins included) of a forward and backward."""
    profiler = cProfile.Profile()
    profiler.runcall(_forward_backward, run)
    return pstats.Stats(profiler).total_calls


def _peak_mib(run: Callable[[], Tensor], device: torch.device) -> float:
    """MiB a forward and backward of ``run`` allocates at its peak above what was allocated before."""
    if device.type == "cpu":
        return peak_allocated_bytes(lambda: _forward_backward(run)) / 2**20
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _forward_backward(run)
    return (torch.cuda.max_memory_allocated(device) - start) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsp", type=int, default=4, help="TSP degree D (the fake group's size)")
    parser.add_argument("--rank", type=int, default=0,
                        help="the fake group's rank this process is (rank 0's attention runs fewer part calls)")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-groups", type=int, help="default: --heads (MHA)")
    parser.add_argument("--ffn", type=int, default=4096, help="gated (SwiGLU) MLP")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--buckets-per-call", default="1",
                        help="comma-separated G values (each dividing --tsp): one attention row per G")
    parser.add_argument("--mlp-schedules", default="ring", help="comma-separated: one MLP row per schedule")
    parser.add_argument("--profile", action="store_true",
                        help="on a GPU, profile one forward and one forward + backward of each schedule")
    args = parser.parse_args()

    d, h, seq, heads = args.tsp, args.hidden, args.seq, args.heads
    kv_groups = args.kv_groups or heads
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dist.init_process_group("fake", rank=args.rank, world_size=d, store=FakeStore())
    group = dist.group.WORLD
    gen = torch.Generator(device).manual_seed(0)

    def weight(rows: int, columns: int) -> Tensor:
        return (torch.randn(rows, columns, generator=gen, device=device) * columns**-0.5).to(dtype).requires_grad_()

    x = torch.randn(seq // d, 1, h, generator=gen, device=device).to(dtype).requires_grad_()
    head_dim = h // heads
    qkv, proj = weight((heads + 2 * kv_groups) * head_dim // d, h), weight(h, h // d)
    fc1, fc2 = weight(2 * args.ffn // d, h), weight(h, args.ffn // d)
    positions = local_positions(seq, d, args.rank, device), gathered_positions(seq, d, device)
    def attention(buckets_per_call: int) -> Callable[[], Tensor]:
        return lambda: tsp_attention(x, qkv, None, proj, *positions, group, heads, kv_groups,
                                     buckets_per_call=buckets_per_call)

    schedules = {f"attention G={g}": attention(int(g)) for g in args.buckets_per_call.split(",")}
    def mlp(schedule: str) -> Callable[[], Tensor]:
        return lambda: tsp_mlp(x, fc1, None, fc2, group, schedule=schedule)

    schedules |= {f"mlp {schedule}": mlp(schedule) for schedule in args.mlp_schedules.split(",")}
    print(f"TSP rank {args.rank} of {d}, S {seq}, h {h}, {heads} heads / {kv_groups} kv groups, ffn {args.ffn} "
          f"gated, {args.dtype} on {device}")
    for name, run in schedules.items():
        forward, backward = _seconds(run, device, args.repeats)
        outputs = []
        forward_ops = tally_work(lambda: outputs.append(run())).operators
        backward_ops = tally_work(lambda: outputs[0].backward(torch.ones_like(outputs[0]))).operators
        print(f"{name:>13}: forward {forward * 1e3:8.1f} ms, backward {backward * 1e3:8.1f} ms "
              f"({backward / forward:.2f}x forward); {forward_ops} + {backward_ops} operators, "
              f"{_python_calls(run)} Python calls; peak {_peak_mib(run, device):.1f} MiB")
        if args.profile and device.type == "cuda":
            print_device_profile(f"{name} forward", run)
            print_device_profile(f"{name} forward + backward", lambda: _forward_backward(run))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
