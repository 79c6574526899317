#!/usr/bin/env bash
# A small real TSP pretraining with Megatron's own pretrain() loop: 4 CPU ranks over gloo by default
# (GPUs and NCCL instead when the machine has them). Extra arguments are Megatron/TSP flags that override
# the defaults, e.g. `bash scripts/quickstart.sh --train-iters 20`; NPROC sets the rank count.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"
NPROC="${NPROC:-4}"
exec "$VENV_PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_tsp.pretrain_gpt \
    --config configs/tiny_gpt_cpu.yaml --tsp-size 2 --pipeline-model-parallel-size 2 "$@"
