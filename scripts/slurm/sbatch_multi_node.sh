#!/usr/bin/env bash
# Multi-node TSP pretraining under Slurm: srun starts one torchrun per node (one rank per GPU), with a static
# rendezvous on the first node of the allocation.
#   sbatch --nodes 8 scripts/slurm/sbatch_multi_node.sh configs/tsp_paper_7b.yaml [Megatron/TSP flags ...]
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.04-py3 sbatch --nodes 8 scripts/slurm/sbatch_multi_node.sh ...
#   DRY_RUN=1 SLURM_NNODES=4 SLURM_JOB_NODELIST='gpu[01-04]' GPUS_PER_NODE=8 \
#     bash scripts/slurm/sbatch_multi_node.sh configs/tsp_paper_7b.yaml --train-iters 100   (preview)
# Submit from the repository root. --tsp-size comes from the config (flags after it override) and must
# divide the GPUs per node; all logic and the environment knobs are in common.sh. The #SBATCH lines are
# defaults: sbatch options override them.
#SBATCH --job-name=megatron-tsp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
# Under sbatch this file runs from a copy in Slurm's spool directory, so common.sh is found through the
# submission directory instead.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $here/common.sh ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/scripts/slurm"
source "$here/common.sh"
tsp_main multi sbatch_multi_node.sh "$@"
