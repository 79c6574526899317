#!/usr/bin/env bash
# Every GPU check of megatron-tsp in one device call, results under $OUT (docs/benchmarks.md: staging and use).
#   1. tests/test_kernels.py, whose cuDNN part-kernel cases run only on a GPU;
#   2. the attention-kernel benchmark at the shape of ../shared/reference/BASELINES.md (S = 128K, D = 8,
#      4 heads of 128 per bucket, bf16): TSP's zigzag kernel against TP's square causal call;
#   3. TSP's attention and MLP schedules, forward and backward, at the paper's 7B shapes (D = 8, S = 32K, bf16);
#   4. one TSP rank and one Megatron TP+SP rank (scripts/bench_gpu.py, both in one process), and Megatron's
#      TP+SP and TP by the shared harness (TP_BASELINE) that measured BASELINES.md, on the paper's 7B at D = 8,
#      SEQS, in the same call on the same GPU (LAYERS, HIDDEN, HEADS, FFN, VOCAB: another model for all, as
#      the shared harness reads them);
#   5. the same two ranks in the other recompute modes the planner weighs: none at NONE_SEQ (32K), selective
#      recompute of the norms and MLPs at SELECTIVE_SEQ (128K, the planner's pick for the 7B on 8 H100s), so
#      that the cost model's terms for them (only checked on CPU so far) meet a GPU's allocator.
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
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"
} > "$out/device.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$out/kernel_tests.txt" 2>&1 || status=1
tail -3 "$out/kernel_tests.txt"
python3 scripts/bench_attention_kernel.py --seq-len "${ATTENTION_SEQ:-131072}" --tsp-size 8 --heads 4 --kv-heads 4 \
    --head-dim 128 --dtype bfloat16 --repeats 3 --no-reference 2>&1 | tee "$out/attention_kernel.txt" || status=1
python3 scripts/bench_layer.py --tsp 8 --seq "${LAYER_SEQ:-32768}" --hidden "${HIDDEN:-4096}" --heads "${HEADS:-32}" \
    --ffn "${FFN:-16384}" --dtype bfloat16 2>&1 | tee "$out/layer.txt" || status=1
bench_gpu() {
    python3 scripts/bench_gpu.py --layers "${LAYERS:-32}" --hidden "${HIDDEN:-4096}" --heads "${HEADS:-32}" \
        --ffn "${FFN:-16384}" --vocab "${VOCAB:-32000}" "$@"
}
bench_gpu --seqs "$seqs" --out "$out/bench_gpu.json" || status=1
SEQS="$seqs" NAME=tp_baseline OUT="$out" python3 "${TP_BASELINE:-../shared/tools/megatron_tp_baseline.py}" || status=1
bench_gpu --seqs "${NONE_SEQ:-32768}" --recompute none --out "$out/bench_gpu_none.json" || status=1
bench_gpu --seqs "${SELECTIVE_SEQ:-131072}" --recompute selective --recompute-modules layernorm mlp \
    --out "$out/bench_gpu_selective.json" || status=1
exit $status
