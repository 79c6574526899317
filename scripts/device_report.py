"""What one ``scripts/device_checks.sh`` call measured, against issue #6's targets and the cost model.

    python scripts/device_report.py RESULTS [--prefix h100_]

RESULTS is the folder the device call wrote (``$OUT``: ``bench_gpu*.json`` and ``log.txt``); docs/results keeps
the H100's with the file prefix ``h100_``. Prints markdown:

- each sweep's peak memory and step time, TSP and TP+SP, and their ratios (``bench_gpu.json``; the fast
  schedules' ``bench_gpu_fast.json`` against the same call's TP+SP; the selective and no-recompute cases);
- the targets: TSP's peak <= 0.9x TP+SP's at 128K and never above it, TSP's step <= 1.05x TP+SP's at every
  length (the faster TSP schedule measured there), TSP's attention kernel <= 1.0x TP's (from ``log.txt``);
- the cost model's compute time (communication faked, as on the device) against every measured step, with
  the GPU's ``tsp_device_factor`` and ``tsp_host_seconds`` as ``cost.py`` has them, and refitted to these TSP
  steps (least squares of the log residuals): the numbers to put into ``cost.py`` after a device call.

No Megatron and no GPU needed; a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_tsp import cost
from megatron_tsp.plan import GPUS

LAYOUTS = {"tsp": "TSP", "tp_sp": "TP+SP"}  # bench_gpu.py's --layouts choice -> the cost model's layout kind
SWEEPS = ("bench_gpu", "bench_gpu_fast", "bench_gpu_selective", "bench_gpu_none")
MEMORY_TARGET_SEQ, MEMORY_TARGET, TIME_TARGET, KERNEL_TARGET = 131072, 0.9, 1.05, 1.0
# bench_attention_kernel.py's last line; "TSP 8 bucket calls" before it took --buckets-per-call
_KERNEL_LINE = re.compile(r"per layer: TSP (\d+) (?:bucket calls|calls of (\d+) head bucket\(s\)) ([0-9.]+) ms "
                          r"vs TP's call ([0-9.]+) ms[^\n]*?(?:\(rank (\d+)\))?$", re.MULTILINE)


def model_inputs(record: dict) -> tuple[cost.ModelShape, cost.Workload, cost.Layout]:
    """A ``scripts/bench_gpu.py`` record (its run's fields) as the cost model describes that run."""
    element = 2 if record["dtype"] == "bf16" else 4
    model = cost.ModelShape(hidden=record["hidden"], layers=record["layers"], heads=record["heads"],
                            kv_groups=record["kv"], head_dim=record["hidden"] // record["heads"], ffn=record["ffn"],
                            vocab=record["vocab"])
    recompute, modules, chunk = _recompute_mode(record["recompute"])
    work = cost.Workload(1, record["seq"], param_bytes=element, act_bytes=element, recompute=recompute,
                         recompute_modules=modules, recompute_chunk=chunk,
                         tsp_keep_weights=record.get("keep_weight_shards", False),
                         tsp_buckets_per_call=record.get("buckets_per_call", 1),  # records before G: 1, the ring
                         tsp_mlp_gather=record.get("mlp_schedule", "ring") == "gather",
                         tsp_vocab_ring=record.get("output_layer", "vocab-ring") == "vocab-ring",
                         tsp_first_rank=record.get("rank", 0) == 0)  # records before --rank: rank 0
    return model, work, cost.Layout(LAYOUTS[record["layout"]], tensor=record["D"])


def _recompute_mode(label: str) -> tuple[cost.Recompute, tuple[str, ...], int]:
    """(mode, selective modules, uniform chunk) from ``cost.Workload.recompute_label``'s text."""
    if label.startswith("sel:"):
        return "selective", tuple(label[4:].split("+")), 1
    if label.startswith("uniform "):
        return "full", ("core_attn",), int(label.split()[1])
    return label, ("core_attn",), 1  # "full" or "none" (bench_gpu.py has no block recompute)


def hardware(device: str, matmul_tflops: float) -> cost.Hardware:
    """The planner's GPU of this name (H100 by default), at the matmul rate measured in the same call."""
    known = next((key for key in GPUS if key.upper() in device.upper()), "h100")
    return replace(GPUS[known], matmul_flops=matmul_tflops * 1e12)


def model_step_s(record: dict, hw: cost.Hardware) -> float:
    """The cost model's compute time of the record's step (what a rank takes with communication faked), at
    the matmul rate measured with it (``matmul_tflops``, which :func:`load` adds) where there is one."""
    if "matmul_tflops" in record:
        hw = replace(hw, matmul_flops=record["matmul_tflops"] * 1e12)
    return cost.step_cost(*model_inputs(record), hw, microbatches=1).compute_s


@dataclass
class Results:
    """One device call's records: per sweep, its device (name, measured matmul TFLOP/s) and run records."""

    device: str
    matmul_tflops: float
    sweeps: dict[str, list[dict]]
    log: str

    def runs(self, sweep: str) -> dict[tuple[str, int], dict]:
        """(layout, seq) -> record, the runs of ``sweep`` that finished."""
        return {(r["layout"], r["seq"]): r for r in self.sweeps.get(sweep, []) if "layout" in r and "error" not in r}


def load(folder: Path, prefix: str = "") -> Results:
    """A device call's sweeps; each run record gets the matmul rate its bench_gpu.py call measured first."""
    sweeps, device, rate = {}, "", 0.0
    for sweep in SWEEPS:
        path = folder / f"{prefix}{sweep}.json"
        if path.exists():
            sweeps[sweep], sweep_rate = json.loads(path.read_text()), 0.0
            for record in sweeps[sweep]:
                if "matmul_bf16_TFLOPs" in record:
                    device, rate = record["device"], record["matmul_bf16_TFLOPs"]
                    sweep_rate = rate
                elif "layout" in record and sweep_rate:
                    record["matmul_tflops"] = sweep_rate
    if not sweeps:
        raise SystemExit(f"no {prefix}bench_gpu*.json in {folder}")
    log = folder / f"{prefix}log.txt" if (folder / f"{prefix}log.txt").exists() else folder / f"{prefix}logs.txt"
    return Results(device, rate, sweeps, log.read_text() if log.exists() else "")


def _ratio_rows(tsp_runs: dict, tp_sp_runs: dict) -> Iterator[tuple[int, dict, dict]]:
    for (layout, seq), tsp in sorted(tsp_runs.items(), key=lambda item: item[0][1]):
        if layout == "tsp" and ("tp_sp", seq) in tp_sp_runs:
            yield seq, tsp, tp_sp_runs[("tp_sp", seq)]


def _length(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def _schedule(record: dict) -> str:
    rank = record.get("rank", 0)  # records before --rank: rank 0
    schedule = f"G={record.get('buckets_per_call', 1)} {record.get('mlp_schedule', 'ring')}"
    return f"{schedule} rank {rank}" if rank else schedule


def sweep_tables(results: Results) -> list[str]:
    lines = []
    for sweep in SWEEPS:
        runs = results.runs(sweep)
        tp_sp = runs if any(layout == "tp_sp" for layout, _ in runs) else results.runs("bench_gpu")
        rows = list(_ratio_rows(runs, tp_sp))
        if not rows:
            continue
        lines += [f"**{sweep}** ({rows[0][1]['recompute']})", "",
                  "| S | TSP schedule | TSP GiB | TP+SP GiB | memory ratio | TSP s | TP+SP s | time ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {_length(seq)} | {_schedule(tsp)} | {tsp['peak_GiB']:.2f} | {tp['peak_GiB']:.2f} | "
                  f"{tsp['peak_GiB'] / tp['peak_GiB']:.3f} | {tsp['step_s']:.3f} | {tp['step_s']:.3f} | "
                  f"{tsp['step_s'] / tp['step_s']:.2f} |" for seq, tsp, tp in rows]
        lines.append("")
    return lines


def targets(results: Results) -> list[str]:
    """Issue #6's targets on the full-recompute sweeps (any TSP schedule measured at a length counts: the
    faster one for time, the smaller for memory) and the attention kernel line of the log."""
    tp_sp = results.runs("bench_gpu")
    ratios: dict[int, list[tuple[float, float]]] = {}  # seq -> (memory ratio, time ratio) per TSP schedule
    for sweep in ("bench_gpu", "bench_gpu_fast"):
        for seq, tsp, tp in _ratio_rows(results.runs(sweep), tp_sp):
            ratios.setdefault(seq, []).append((tsp["peak_GiB"] / tp["peak_GiB"], tsp["step_s"] / tp["step_s"]))
    best = {seq: (min(m for m, _ in pairs), min(t for _, t in pairs)) for seq, pairs in ratios.items()}
    lines = ["| target | measured | met |", "|---|---|---|"]
    if MEMORY_TARGET_SEQ in best:
        ratio = best[MEMORY_TARGET_SEQ][0]
        lines.append(f"| memory <= {MEMORY_TARGET}x TP+SP at 128K | {ratio:.3f} | {_met(ratio <= MEMORY_TARGET)} |")
    if best:
        worst = max(memory for memory, _ in best.values())
        lines.append(f"| memory <= 1.0x at every length | at most {worst:.3f} | {_met(worst <= 1.0)} |")
        times = ", ".join(f"{_length(seq)} {time:.2f}" for seq, (_, time) in sorted(best.items()))
        met = all(time <= TIME_TARGET for _, time in best.values())
        lines.append(f"| step time <= {TIME_TARGET}x at every length | {times} | {_met(met)} |")
    for calls, buckets, tsp_ms, tp_ms, rank in _KERNEL_LINE.findall(results.log):
        ratio = float(tsp_ms) / float(tp_ms)
        lines.append(f"| attention kernel <= {KERNEL_TARGET}x TP's | {ratio:.2f} ({calls} calls of "
                     f"{buckets or 1} bucket(s), rank {rank or 0}: {tsp_ms} vs {tp_ms} ms) | "
                     f"{_met(ratio <= KERNEL_TARGET)} |")
    return lines


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def fit_tsp_compute(records: list[dict], hw: cost.Hardware) -> cost.Hardware:
    """``hw`` with the ``tsp_device_factor`` and ``tsp_host_seconds`` that minimise the sum of squared log
    residuals of :func:`model_step_s` over the TSP records (a grid search refined three times around its
    best: the model is piecewise linear in both)."""
    def loss(factor: float, host_s: float) -> float:
        fitted = replace(hw, tsp_device_factor=factor, tsp_host_seconds=host_s)
        return sum(math.log(model_step_s(r, fitted) / r["step_s"]) ** 2 for r in records)

    factor, host_s, factor_step, host_step = 1.5, 2.5e-3, 0.1, 0.5e-3
    for _ in range(4):  # 1.0-2.0 and 0-5 ms, then 5x finer around the best, three times
        grid = [(factor + i * factor_step, host_s + j * host_step) for i in range(-5, 6) for j in range(-5, 6)]
        factor, host_s = min(((f, h) for f, h in grid if f > 0 and h >= 0), key=lambda point: loss(*point))
        factor_step, host_step = factor_step / 5, host_step / 5
    return replace(hw, tsp_device_factor=factor, tsp_host_seconds=host_s)


def model_table(results: Results, hws: dict[str, cost.Hardware]) -> list[str]:
    """Model / measured - 1 of every step, for each named calibration."""
    names = list(hws)
    lines = ["| sweep | layout | S | measured s | " + " | ".join(f"model ({name})" for name in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for sweep in SWEEPS:
        for (layout, seq), record in sorted(results.runs(sweep).items(), key=lambda item: (item[0][0], item[0][1])):
            modelled = [model_step_s(record, hw) for hw in hws.values()]
            cells = " | ".join(f"{seconds:.3f} ({seconds / record['step_s'] - 1:+.1%})" for seconds in modelled)
            label = f"{LAYOUTS[layout]} {_schedule(record)}" if layout == "tsp" else LAYOUTS[layout]
            lines.append(f"| {sweep} | {label} | {_length(seq)} | {record['step_s']:.3f} | {cells} |")
    return lines


def report(results: Results) -> str:
    hw = hardware(results.device or "H100", results.matmul_tflops or GPUS["h100"].matmul_flops / 1e12)
    tsp_records = [r for sweep in SWEEPS for (layout, _), r in results.runs(sweep).items() if layout == "tsp"]
    fitted = fit_tsp_compute(tsp_records, hw) if tsp_records else hw
    if results.matmul_tflops:
        lines = [f"Device: {results.device}; the model's rate for each row is the bf16 matmul rate measured in "
                 f"the same bench_gpu.py call (last: {results.matmul_tflops:.0f} TFLOP/s).", ""]
    else:
        lines = [f"No GPU (bench_gpu.py measured no matmul rate): the model runs at {hw.name}'s.", ""]
    lines += sweep_tables(results) + ["Targets (issue #6):", ""] + targets(results) + [""]
    lines += [f"Cost model's compute time: as `cost.py` has it (tsp_device_factor {hw.tsp_device_factor:.3f}, "
              f"tsp_host_seconds {hw.tsp_host_seconds * 1e3:.3f} ms) and refitted to these TSP steps "
              f"(tsp_device_factor {fitted.tsp_device_factor:.3f}, tsp_host_seconds "
              f"{fitted.tsp_host_seconds * 1e3:.3f} ms):", ""]
    lines += model_table(results, {"cost.py": hw, "refitted": fitted})
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the device call's $OUT folder (or docs/results)")
    parser.add_argument("--prefix", default="", help="file-name prefix, e.g. h100_ for docs/results")
    args = parser.parse_args()
    print(report(load(args.results, args.prefix)))


if __name__ == "__main__":
    main()
