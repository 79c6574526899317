# shellcheck shell=bash
# Shared logic of the Slurm launchers sbatch_single_node.sh and sbatch_multi_node.sh (sourced, not executed).
#
# One launch = one `srun` task per node, each running one torchrun with a static rendezvous:
#   master = first host of SLURM_JOB_NODELIST (`scontrol show hostnames`), --nnodes SLURM_NNODES,
#   --node-rank SLURM_NODEID (evaluated on each node), --nproc-per-node = GPUs per node.
# torchrun then starts one rank per GPU running `-m megatron_tsp.pretrain_gpt --config CONFIG [flags]`.
#
# Environment knobs (all optional):
#   CONTAINER_IMAGE   run each node's torchrun inside this image via pyxis/enroot (`srun --container-image`);
#                     unset = run on the host with PYTHON. The image needs torch and megatron-core 0.19.2;
#                     the repository is mounted at the same path and used as the working directory.
#   CONTAINER_MOUNTS  extra pyxis mounts (src:dst[,src:dst...]), e.g. datasets and checkpoint directories.
#   PYTHON            interpreter on each node (default: the repository's .venv if present, else python3;
#                     `python` inside a container).
#   GPUS_PER_NODE     ranks per node (default: SLURM_GPUS_ON_NODE, else 8).
#   MASTER_ADDR/PORT  override the rendezvous host / port (default: first host, 20000 + job id % 20000).
#   DRY_RUN=1         print the command each node would run, one line per node, and launch nothing; works
#                     without Slurm (fake SLURM_NNODES / SLURM_JOB_NODELIST, or let it invent node names).

TSP_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TSP_REPO_ROOT="$(cd "$TSP_SLURM_DIR/../.." && pwd)"

tsp_die() {
    echo "megatron-tsp slurm: error: $*" >&2
    exit 1
}

tsp_usage() {
    cat >&2 <<EOF
usage: sbatch [sbatch options] $1 CONFIG.yaml [Megatron/TSP flags ...]
       DRY_RUN=1 [SLURM_NNODES=N SLURM_JOB_NODELIST=LIST GPUS_PER_NODE=G] bash $1 CONFIG.yaml [flags ...]
Flags after the config override it (e.g. --train-iters 100). See scripts/slurm/common.sh for the knobs.
EOF
    exit 2
}

# Value of a top-level key in a flat YAML config ("" if absent); keys may carry a leading "--" as in
# megatron_tsp.args.config_to_argv. Plain sed: the batch host may lack the Python env.
tsp_config_value() {
    local file=$1 key=$2
    sed -n -E "s/^(--)?${key}:[[:space:]]*[\"']?([^\"'#[:space:]]+).*/\\2/p" "$file" | tail -n 1
}

# The GPU count a config is sized for: its machine-readable header line `# gpus: N` ("" if absent).
tsp_config_gpus() {
    sed -n -E 's/^#[[:space:]]*gpus:[[:space:]]*([0-9]+)[[:space:]]*$/\1/p' "$1" | head -n 1
}

# The effective --tsp-size: the last one on the command line wins over the config (as in expand_config).
tsp_effective_tsp_size() {
    local config=$1 value
    shift
    value=$(tsp_config_value "$config" tsp-size)
    while (($#)); do
        case $1 in
            --tsp-size) value=${2:-}; shift ;;
            --tsp-size=*) value=${1#--tsp-size=} ;;
        esac
        shift
    done
    echo "${value:-1}"
}

# Expand a Slurm node list without scontrol (dry runs off-cluster only): "a,b", "gpu[01-03,07]",
# "rack1-[1-2]-x". One bracket group per entry; real jobs use `scontrol show hostnames`.
tsp_expand_nodelist() {
    local list=$1 entry current="" ch depth=0 i n lo hi range
    local -a entries=() ranges=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            '[') depth=1 ;;
            ']') depth=0 ;;
        esac
        if [[ $ch == "," && $depth == 0 ]]; then
            entries+=("$current")
            current=""
        else
            current+=$ch
        fi
    done
    entries+=("$current")
    for entry in "${entries[@]}"; do
        if [[ $entry =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; then
            local prefix=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
            IFS=, read -r -a ranges <<<"$body"
            for range in "${ranges[@]}"; do
                lo=${range%-*}
                hi=${range#*-}
                for ((n = 10#$lo; n <= 10#$hi; n++)); do
                    printf '%s%0*d%s\n' "$prefix" "${#lo}" "$n" "$suffix"  # keep zero padding (gpu007)
                done
            done
        elif [[ -n $entry ]]; then
            echo "$entry"
        fi
    done
}

tsp_hostnames() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
    else
        tsp_expand_nodelist "$1"
    fi
}

# NCCL / PyTorch settings, exported so that srun (default --export=ALL) and pyxis pass them to every rank.
# Values already set by the user win.
TSP_ENV_VARS=(CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS
              NCCL_DEBUG PYTHONUNBUFFERED)
tsp_export_env() {
    # One hardware work queue per GPU, so kernels are issued in program order: Megatron relies on it to
    # overlap its sequence-parallel communication with compute, and asserts it for tensor parallel > 1
    # (the TSP axis) on pre-Blackwell GPUs.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A failed or timed-out NCCL collective aborts the process instead of hanging until the job time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Free async-collective buffers on stream sync rather than via recordStream (lower peak memory).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Log lines reach the Slurm output file as they happen.
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
    # Cluster-specific network settings belong in the environment of `sbatch` (they are passed through), e.g.
    #   NCCL_IB_HCA=mlx5_0,mlx5_1,...   the InfiniBand/RoCE adapters to use (`ibv_devinfo` lists them)
    #   NCCL_IB_GID_INDEX=3             RoCE v2 fabrics
    #   NCCL_SOCKET_IFNAME=ib0|eth0     interface for NCCL's bootstrap (and torchrun's rendezvous host)
    #   NCCL_IB_TIMEOUT=22, NCCL_IB_RETRY_CNT=7   large fabrics with occasional link flaps
    #   NCCL_NET_GDR_LEVEL=PHB          GPUDirect RDMA distance; NCCL_DEBUG=INFO to see what NCCL picked
}

# Resolve the layout from Slurm's variables: sets TSP_NNODES, TSP_HOSTS, TSP_GPUS_PER_NODE, TSP_MASTER_ADDR,
# TSP_MASTER_PORT.
tsp_rendezvous() {
    TSP_NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    if [[ -z $nodelist ]]; then
        [[ ${DRY_RUN:-0} == 1 ]] || tsp_die "SLURM_JOB_NODELIST is not set: submit with sbatch (or preview with DRY_RUN=1)"
        nodelist=$(printf 'node%03d,' $(seq 1 "$TSP_NNODES"))  # invented names for an off-cluster preview
        nodelist=${nodelist%,}
    fi
    if ! command -v scontrol >/dev/null 2>&1 && [[ ${DRY_RUN:-0} != 1 ]]; then
        tsp_die "scontrol not found: run inside a Slurm allocation (or preview with DRY_RUN=1)"
    fi
    mapfile -t TSP_HOSTS < <(tsp_hostnames "$nodelist")
    ((${#TSP_HOSTS[@]} == TSP_NNODES)) ||
        tsp_die "node list '$nodelist' has ${#TSP_HOSTS[@]} host(s) but SLURM_NNODES is $TSP_NNODES"
    TSP_GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    [[ $TSP_GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || tsp_die "GPUs per node '$TSP_GPUS_PER_NODE' is not a positive integer"
    TSP_MASTER_ADDR=${MASTER_ADDR:-${TSP_HOSTS[0]}}
    # Derived from the job id so that two jobs sharing a node do not collide on the port.
    TSP_MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}
}

# tsp_main KIND SCRIPT_NAME CONFIG [flags...]: validate, then launch (or print) one torchrun per node.
# KIND is "single" (refuses more than one node) or "multi".
tsp_main() {
    local kind=$1 script=$2
    shift 2
    (($# >= 1)) || tsp_usage "$script"
    [[ $1 != -h && $1 != --help ]] || tsp_usage "$script"
    [[ -f $1 ]] || tsp_die "config file '$1' not found (paths are relative to the submission directory)"
    local config
    config="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"  # absolute: every node resolves it alike
    shift
    local -a flags=("$@")

    tsp_rendezvous
    if [[ $kind == single && $TSP_NNODES != 1 ]]; then
        tsp_die "sbatch_single_node.sh got $TSP_NNODES nodes; use sbatch_multi_node.sh for more than one"
    fi
    local tsp world config_gpus
    tsp=$(tsp_effective_tsp_size "$config" "${flags[@]}")
    [[ $tsp =~ ^[1-9][0-9]*$ ]] || tsp_die "tsp-size '$tsp' is not a positive integer"
    world=$((TSP_NNODES * TSP_GPUS_PER_NODE))
    # A TSP group is tsp consecutive ranks (the innermost mesh axis): it stays on one node's NVLink only if
    # tsp-size divides the GPUs per node. Its all-gathers and weight ring run every layer, so across nodes
    # they would be network-bound.
    ((TSP_GPUS_PER_NODE % tsp == 0)) ||
        tsp_die "tsp-size $tsp does not divide $TSP_GPUS_PER_NODE GPUs per node; TSP groups must stay inside a node"
    echo "# megatron-tsp: $TSP_NNODES node(s) x $TSP_GPUS_PER_NODE GPUs = world size $world, tsp-size $tsp" \
        "($((world / tsp)) TSP group(s)), master $TSP_MASTER_ADDR:$TSP_MASTER_PORT, config $config"
    config_gpus=$(tsp_config_gpus "$config")
    if [[ -n $config_gpus && $config_gpus != "$world" ]]; then
        echo "# note: the config is sized for $config_gpus GPUs (its '# gpus:' header), this job has $world:" \
            "data parallelism differs; --global-batch-size must stay a multiple of micro-batch x data-parallel size"
    fi

    tsp_export_env
    local python=${PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -n ${CONTAINER_IMAGE:-} ]]; then
            python=python
        elif [[ -x $TSP_REPO_ROOT/.venv/bin/python ]]; then
            python=$TSP_REPO_ROOT/.venv/bin/python
        else
            python=python3
        fi
    fi
    # Everything after torchrun's --node-rank, identical on every node.
    local -a tail=(--nnodes "$TSP_NNODES" --nproc-per-node "$TSP_GPUS_PER_NODE"
                   --master-addr "$TSP_MASTER_ADDR" --master-port "$TSP_MASTER_PORT"
                   -m megatron_tsp.pretrain_gpt --config "$config" "${flags[@]}")
    local -a srun_args=(--nodes "$TSP_NNODES" --ntasks-per-node 1 --kill-on-bad-exit 1)
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        srun_args+=(--container-image "$CONTAINER_IMAGE"
                    --container-mounts "$TSP_REPO_ROOT:$TSP_REPO_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                    --container-workdir "$TSP_REPO_ROOT")
    fi
    local env_line="" name
    for name in "${TSP_ENV_VARS[@]}"; do
        env_line+=" $name=${!name}"
    done
    echo "# env:$env_line"
    echo "# srun ${srun_args[*]} (one task per node; each runs the line for its SLURM_NODEID)"

    if [[ ${DRY_RUN:-0} == 1 ]]; then
        local rank
        for ((rank = 0; rank < TSP_NNODES; rank++)); do
            printf '[node %d/%d %s] ' "$rank" "$TSP_NNODES" "${TSP_HOSTS[rank]}"
            printf '%q ' "$python" -m torch.distributed.run --node-rank "$rank" "${tail[@]}"
            echo
        done
        return 0
    fi
    cd "$TSP_REPO_ROOT"  # `-m megatron_tsp...` imports the package from the working directory
    export PYTHONPATH="$TSP_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # The node rank is read on each node (single quotes: SLURM_NODEID expands in the task, not here).
    # shellcheck disable=SC2016
    exec srun "${srun_args[@]}" bash -c 'exec "$1" -m torch.distributed.run --node-rank "$SLURM_NODEID" "${@:2}"' \
        tsp-node "$python" "${tail[@]}"
}
