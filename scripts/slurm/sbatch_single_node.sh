#!/usr/bin/env bash
# One-node TSP pretraining under Slurm: one torchrun with one rank per GPU.
#   sbatch scripts/slurm/sbatch_single_node.sh configs/llama3_8b_gqa.yaml [Megatron/TSP flags ...]
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.04-py3 sbatch scripts/slurm/sbatch_single_node.sh ...   (pyxis)
#   DRY_RUN=1 bash scripts/slurm/sbatch_single_node.sh configs/llama3_8b_gqa.yaml   (preview, no Slurm needed)
# Submit from the repository root. --tsp-size comes from the config (flags after it override); all logic
# and the environment knobs are in common.sh. The #SBATCH lines are defaults: sbatch options override them.
#SBATCH --job-name=megatron-tsp
#SBATCH --nodes=1
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
tsp_main single sbatch_single_node.sh "$@"
