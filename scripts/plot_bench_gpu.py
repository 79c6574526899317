"""Plot scripts/bench_gpu.py results: per-rank peak memory (measured, with Adam state, and the cost model's)
and step time against sequence length, one line per layout.

    python scripts/plot_bench_gpu.py docs/results/h100_bench_gpu.json --out docs/results/h100_bench_gpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"tsp": "TSP", "tp_sp": "Megatron TP+SP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a bench_gpu.py --out JSON")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    records = [r for r in json.loads(args.results.read_text()) if "layout" in r and "error" not in r]
    device = next((r["device"] for r in json.loads(args.results.read_text()) if "device" in r), "CPU")
    figure, (memory, time) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, name in NAMES.items():
        runs = sorted((r for r in records if r["layout"] == layout), key=lambda r: r["seq"])
        if not runs:
            continue
        seqs = [r["seq"] // 1024 for r in runs]
        line, = memory.plot(seqs, [r["peak_plus_adam_GiB"] for r in runs], "o-", label=f"{name}, measured")
        adam = [r["peak_plus_adam_GiB"] - r["peak_GiB"] for r in runs]
        memory.plot(seqs, [r["model_peak_GiB"] + a for r, a in zip(runs, adam)], "x--", color=line.get_color(),
                    label=f"{name}, cost model")
        time.plot(seqs, [r["step_s"] for r in runs], "o-", label=name)
    first = records[0]
    title = f"{first['layers']} layers, h {first['hidden']}, D = {first['D']}, {first['recompute']} recompute"
    memory.set(xlabel="sequence length (K tokens)", ylabel="peak GiB per rank, with Adam", title=title)
    time.set(xlabel="sequence length (K tokens)", ylabel="step seconds per rank (communication faked)",
             title=device)
    for axes in (memory, time):
        axes.set_xscale("log", base=2)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
