"""Time TSP's core attention per head bucket, forward + backward: the zigzag backend vs the dense-mask reference,
and TSP's whole attention vs Megatron TP's.

One rank's call (``--rank``, default 0; zigzag gives every rank the same FLOPs, but rank 0's first query
chunk has no keys before it: three part calls and one merge where the other ranks run four and two):
q ``[S/D, B, G*nq/D, hd]`` against the gathered K/V ``[S, B, G*nkv/D, hd]``, for G head buckets per call
(``--buckets-per-call``, TSP's ``--tsp-attention-buckets-per-call``). Prints the median wall time of each
kernel, run round-robin (and the peak memory on CUDA). A TSP rank makes D/G such calls per layer; a TP rank
makes one square causal call over the whole sequence with one bucket's heads (SDPA, default dispatch), the
same FLOPs: the last line compares the two.

    .venv/bin/python scripts/bench_attention_kernel.py --seq-len 4096 --tsp-size 4 [--buckets-per-call 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.kernels import CausalAttention, causal_attention, math_part_kernel, zigzag_causal_attention
from megatron_tsp.zigzag import gathered_positions, local_positions

def _fwd_bwd(kernel: CausalAttention, inputs: list[Tensor], grad_out: Tensor, positions: tuple[Tensor, Tensor],
             scale: float) -> tuple[float, int]:
    """(seconds of one forward + backward, peak bytes on CUDA else 0). ``inputs``: q and the packed K/V
    ``[S, b, 2*nkv, hd]``, whose halves the kernel gets as views (as TSP attention hands them over)."""
    device = grad_out.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    q, kv = inputs
    out = kernel(q, *kv.chunk(2, dim=2), *positions, scale)
    torch.autograd.grad(out, inputs, grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    return time.perf_counter() - start, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tsp-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=0, help="the TSP rank whose call is timed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="query heads per bucket (nq/D)")
    parser.add_argument("--kv-heads", type=int, default=4, help="kv heads per bucket (nkv/D)")
    parser.add_argument("--buckets-per-call", type=int, default=1, help="head buckets per TSP call (G, dividing D)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the dense-mask reference (its [S/D, S] mask and scores) at long sequences")
    args = parser.parse_args()
    if args.buckets_per_call < 1 or args.tsp_size % args.buckets_per_call:
        parser.error(f"--buckets-per-call {args.buckets_per_call} must divide --tsp-size {args.tsp_size}")
    if not 0 <= args.rank < args.tsp_size:
        parser.error(f"--rank {args.rank} must be a rank of the group of --tsp-size {args.tsp_size}")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    seq_len, tsp_size, g = args.seq_len, args.tsp_size, args.buckets_per_call
    gen = torch.Generator(device).manual_seed(0)

    def random(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q, kv = random(seq_len // tsp_size, args.batch, g * args.heads, args.head_dim), \
        random(seq_len, args.batch, 2 * g * args.kv_heads, args.head_dim)
    inputs = [t.requires_grad_() for t in (q, kv)]
    grad_out = random(q.shape[0], args.batch, g * args.heads * args.head_dim)
    positions = (local_positions(seq_len, tsp_size, args.rank, device),
                 gathered_positions(seq_len, tsp_size, device))
    scale = args.head_dim ** -0.5

    # TP's per-rank call: all S queries of one bucket's heads; positions are ignored
    tp_inputs = [random(seq_len, args.batch, args.heads, args.head_dim).requires_grad_(),
                 random(seq_len, args.batch, 2 * args.kv_heads, args.head_dim).requires_grad_()]
    tp_grad_out = random(seq_len, args.batch, args.heads * args.head_dim)

    def tp_square_causal(q: Tensor, k: Tensor, v: Tensor, *_: object) -> Tensor:
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True,
                                             scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        return out.permute(2, 0, 1, 3).flatten(2)

    kernels: dict[str, CausalAttention] = {"zigzag, default part kernel": zigzag_causal_attention}
    if not args.no_reference:
        kernels = {"dense-mask reference (causal_attention)": causal_attention, **kernels}
    if device.type == "cpu":  # the default there is the fused kernel; show the portable one too
        kernels["zigzag, math part kernel"] = (
            lambda *a: zigzag_causal_attention(*a, part_kernel=math_part_kernel()))
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {args.dtype}, S={seq_len}, D={tsp_size}, "
          f"B={args.batch}, heads {args.heads}/{args.kv_heads} per bucket, {g} bucket(s) per call, "
          f"hd={args.head_dim}; fwd+bwd of rank {args.rank}'s call, median of {args.repeats}")
    # Round-robin over the kernels, so that load from other processes hits them alike; step 0 is warm-up.
    tp_name = "TP: one square causal SDPA call over S"
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in (*kernels, tp_name)}
    for step in range(args.repeats + 1):
        for name, kernel in kernels.items():
            result = _fwd_bwd(kernel, inputs, grad_out, positions, scale)
            if step:
                runs[name].append(result)
        result = _fwd_bwd(tp_square_causal, tp_inputs, tp_grad_out, positions, scale)
        if step:
            runs[tp_name].append(result)
    reference = statistics.median(seconds for seconds, _ in runs[next(iter(kernels))])
    for name, results in runs.items():
        seconds = statistics.median(seconds for seconds, _ in results)
        peak = max(peak for _, peak in results)
        memory = f", peak {peak / 2**20:.0f} MiB" if peak else ""
        print(f"  {name:42s} {seconds * 1e3:9.1f} ms  ({reference / seconds:.2f}x the first one's speed){memory}")
    calls = tsp_size // g
    tsp_layer, tp_layer = (calls * statistics.median(s for s, _ in runs["zigzag, default part kernel"]),
                           statistics.median(s for s, _ in runs[tp_name]))
    print(f"per layer: TSP {calls} calls of {g} head bucket(s) {tsp_layer * 1e3:.1f} ms vs TP's call "
          f"{tp_layer * 1e3:.1f} ms: {tsp_layer / tp_layer:.2f}x TP's time (rank {args.rank})")

if __name__ == "__main__":
    main()
