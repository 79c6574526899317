"""Device call 2 of 2026-11-27 (docs/benchmarks.md): attention kernel variants at TSP's shapes on a GPU. Run from the
repository root with megatron-core importable: python3 docs/results/h100_experiments.py"""
import statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "scripts")
from device_profile import print_device_profile
from megatron_tsp.kernels import PartKernel, zigzag_causal_attention
from megatron_tsp.kernels import cudnn
from megatron_tsp.zigzag import gathered_positions, local_positions

dev, dt, D, hd = torch.device("cuda"), torch.bfloat16, 8, 128
contiguous_kv = PartKernel(lambda q, k, v, c, s: cudnn.forward(q, k.contiguous(), v.contiguous(), c, s),
                           lambda go, q, k, v, o, l, c, s: cudnn.backward(go, q, k.contiguous(), v.contiguous(), o, l, c, s))

def median_ms(fn, reps=5):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3

for S in (16384, 32768, 131072):
    pos = local_positions(S, D, 0, dev), gathered_positions(S, D, dev)
    for heads in (4, 32):
        q = torch.randn(S // D, 1, heads, hd, device=dev, dtype=dt, requires_grad=True)
        kv = torch.randn(S, 1, 2 * heads, hd, device=dev, dtype=dt, requires_grad=True)
        go = torch.randn(S // D, 1, heads * hd, device=dev, dtype=dt)
        def zz(part_kernel=None, backward=True):
            out = zigzag_causal_attention(q, *kv.chunk(2, dim=2), *pos, hd**-0.5, part_kernel=part_kernel)
            if backward:
                torch.autograd.grad(out, (q, kv), go)
        tq = torch.randn(S, 1, heads, hd, device=dev, dtype=dt, requires_grad=True)
        tgo = torch.randn(S, 1, heads * hd, device=dev, dtype=dt)
        def tp(backward=True):
            out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (tq, *kv.chunk(2, dim=2))),
                                                 is_causal=True, scale=hd**-0.5)
            out = out.permute(2, 0, 1, 3).flatten(2)
            if backward:
                torch.autograd.grad(out, (tq, kv), tgo)
        calls = D if heads == 4 else 1
        r = {"zigzag": median_ms(zz), "zigzag_contig_kv": median_ms(lambda: zz(contiguous_kv)),
             "zigzag_fwd": median_ms(lambda: zz(backward=False)), "tp": median_ms(tp),
             "tp_fwd": median_ms(lambda: tp(False))}
        print(f"S={S} heads/call={heads} calls/layer={calls}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r.items())
              + f"; per layer zigzag {calls * r['zigzag']:.1f} ms vs TP {r['tp']:.1f} ms (TP at 4 heads/rank x D/calls)", flush=True)
        if heads == 4 and S in (32768, 131072):
            print_device_profile(f"zigzag S={S} 4 heads fwd+bwd", zz)
            print_device_profile(f"TP S={S} 4 heads fwd+bwd", tp)
