#!/usr/bin/env bash
# Every GPU check of megatron-tsp in one device call, results under $OUT (docs/benchmarks.md: staging and use),
# most wanted first, each step under its own time limit (STEP_LIMIT_S, seconds) so that one slow or hung step
# leaves the device's time to the rest:
#   1. one TSP rank and one Megatron TP+SP rank (scripts/bench_gpu.py, both in one process, both layouts per
#      length) on the paper's 7B at D = 8, SEQS, full recompute (LAYERS, HIDDEN, HEADS, FFN, VOCAB: another
#      model for all steps, as the shared harness reads them);
#   2. the TSP rank again with the fast schedules, one attention call over the D head buckets
#      (--buckets-per-call D) and the MLP by gathered weights (--mlp-schedule gather): fewer kernel launches
#      for larger transients; same SEQS, TSP only;
#   3. the attention-kernel benchmark at the shape of ../shared/reference/BASELINES.md (S = 128K, D = 8,
#      4 heads of 128 per bucket, bf16): TSP's zigzag kernel against TP's square causal call, one head bucket
#      per call (8 calls per layer) and all 8 in one call, and all 8 for rank 0 too;
#   4. tests/test_kernels.py and tests/test_grads.py, whose cuDNN part-kernel and fused fp32-accumulation
#      cases run only on a GPU;
#   5. the same two ranks with the norms and MLPs recomputed at SELECTIVE_SEQ (128K, the planner's pick for
#      the 7B on 8 H100s), and without recompute at NONE_SEQ (32K): the cost model's terms for them against a
#      GPU's allocator;
#   6. TSP's attention (one bucket per call, and all D in one call) and MLP (ring, gathered) schedules,
#      forward and backward, at the paper's 7B shapes (D = 8, S = 32K, bf16);
#   7. Megatron's TP+SP by the shared harness (TP_BASELINE) that measured BASELINES.md, same model and SEQS,
#      in the same call on the same GPU (the calibration of step 1's TP+SP rank);
#   8. both ranks' steps profiled (device-busy time, kernel launches, top kernels) on 4 of the layers at the
#      shortest and longest of SEQS, TSP with the fast schedules (profiling all 32 layers' steps takes minutes);
#   9. the host's side of a step: operators per layer and the time per layer and step at tiny shapes
#      (scripts/count_step_ops.py --time-steps), TP+SP against TSP with one bucket per call and with the fast
#      schedules, where kernel launches and Python set the pace (short sequences);
#  10. scripts/device_report.py on what the steps wrote: issue #6's targets, and the cost model's step time
#      against every measured step with its TSP compute calibration refitted (CPU work; the same command
#      on the fetched files gives the same report).
# Every TSP measurement is of rank TSP_RANK (default 7 of 8): zigzag gives every rank the same FLOPs, but rank
# 0's first query chunk has no keys before it, so its attention runs three part calls and one merge per
# query-chunk pair where the other seven run four and two, and a step waits for the slowest rank; the kernel
# benchmark also times rank 0 (the H100 call of 2026-11-27 measured rank 0 only).
# About 6 minutes on an H100. Output: log.txt (every step's), device.txt and the JSONs (the device tool
# returns at most 8 files).
# Wheels in .whl/ (megatron-core, which the GPU image lacks) are installed first.
set -uo pipefail
out=${OUT:?set OUT to the results folder}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
seqs=${SEQS:-16384,32768,65536,131072}
rank=${TSP_RANK:-7}
limit=${STEP_LIMIT_S:-300}
status=0
step() {  # step COMMAND...: run under the step limit, output to the terminal and $out/log.txt
    echo "=== $(date -u +%T) $*" | tee -a "$out/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt" || { status=1; echo "=== FAILED or cut at ${limit} s" |
        tee -a "$out/log.txt"; }
}
bench_gpu=(python3 scripts/bench_gpu.py --rank "$rank" --layers "${LAYERS:-32}" --hidden "${HIDDEN:-4096}"
           --heads "${HEADS:-32}" --ffn "${FFN:-16384}" --vocab "${VOCAB:-32000}")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"
} > "$out/device.txt" 2>&1
step "${bench_gpu[@]}" --seqs "$seqs" --out "$out/bench_gpu.json"
step "${bench_gpu[@]}" --seqs "$seqs" --layouts tsp --buckets-per-call 8 --mlp-schedule gather \
    --out "$out/bench_gpu_fast.json"
for buckets_rank in "1 $rank" "8 $rank" "8 0"; do
    read -r buckets kernel_rank <<< "$buckets_rank"
    step python3 scripts/bench_attention_kernel.py --seq-len "${ATTENTION_SEQ:-131072}" --tsp-size 8 \
        --buckets-per-call "$buckets" --rank "$kernel_rank" --heads 4 --kv-heads 4 --head-dim 128 --dtype bfloat16 \
        --repeats 3 --no-reference
done
step python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_grads.py
step "${bench_gpu[@]}" --seqs "${SELECTIVE_SEQ:-131072}" --recompute selective \
    --recompute-modules layernorm mlp --out "$out/bench_gpu_selective.json"
step "${bench_gpu[@]}" --seqs "${NONE_SEQ:-32768}" --recompute none --out "$out/bench_gpu_none.json"
step python3 scripts/bench_layer.py --tsp 8 --rank "$rank" --seq "${LAYER_SEQ:-32768}" --hidden "${HIDDEN:-4096}" \
    --heads "${HEADS:-32}" --ffn "${FFN:-16384}" --dtype bfloat16 --buckets-per-call 1,8 --mlp-schedules ring,gather
[[ -n ${TP_BASELINE:-} || -e ../shared/tools/megatron_tp_baseline.py ]] &&
    SEQS="$seqs" LAYOUTS=tp_sp NAME=tp_baseline OUT="$out" \
        step python3 "${TP_BASELINE:-../shared/tools/megatron_tp_baseline.py}"
step "${bench_gpu[@]}" --layers 4 --seqs "${seqs%%,*},${seqs##*,}" --buckets-per-call 8 --mlp-schedule gather \
    --profile --out "$out/bench_gpu_profiled.json"
step python3 scripts/count_step_ops.py --tsp 8 --rank "$rank" --buckets-per-call 1,8 --mlp-schedule gather \
    --dtype bf16 --time-steps 20
step python3 scripts/device_report.py "$out"
exit $status
