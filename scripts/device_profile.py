"""Where one call's time goes on a GPU: wall time, time the device was busy, and the kernels that filled it.

Used by the benchmarks' ``--profile`` flags (torch profiler, CPU and CUDA activity). A device busy for much
less than the wall time is waiting for the host (launch overhead, syncs); otherwise the kernel table says
which kernels to speed up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def print_device_profile(label: str, fn: Callable[[], object], rows: int = 12) -> None:
    """Run ``fn()`` once under the profiler and print its wall time, device-busy time, kernel launches and
    the ``rows`` kernels with the most device time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    launches = sum(e.count for e in kernels)
    print(f"profile {label}: wall {wall * 1e3:.1f} ms (under the profiler), device busy {busy * 1e3:.1f} ms "
          f"({busy / wall:.0%}), {launches} kernels")
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"  {event.self_device_time_total / 1e3:9.2f} ms {event.count:6d}x  {event.key[:110]}")
