"""Device call 3 of 2026-11-27 (docs/benchmarks.md): can a bf16 GEMM accumulate straight into an fp32 buffer?"""
import time, torch
import torch.nn.functional as F
dev = torch.device("cuda")
acc0 = torch.randn(16384, 4096, device=dev)
x = torch.randn(16384, 512, device=dev, dtype=torch.bfloat16)
w = torch.randn(4096, 512, device=dev, dtype=torch.bfloat16)
ref = acc0 + torch.mm(x.float(), w.float().t())
def timed(fn, reps=20):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps * 1e3
acc = acc0.clone()
def current(): acc.add_(F.linear(x, w))
print(f"current acc += F.linear: {timed(current):.3f} ms")
for name, call in [("aten.addmm.dtype_out", lambda a: torch.ops.aten.addmm.dtype_out(a, x, w.t(), torch.float32, out=a)),
                   ("torch.addmm(out_dtype, out=)", lambda a: torch.addmm(a, x, w.t(), out_dtype=torch.float32, out=a))]:
    try:
        a = acc0.clone(); call(a); torch.cuda.synchronize()
        err = ((a - ref).abs().max() / ref.abs().max()).item()
        a2 = acc0.clone(); current_err = ((a2.add_(F.linear(x, w)) - ref).abs().max() / ref.abs().max()).item()
        print(f"{name}: ok, max rel err {err:.2e} (current {current_err:.2e}), {timed(lambda: call(a)):.3f} ms")
    except Exception as e:
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}")
