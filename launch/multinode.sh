#!/usr/bin/env bash
# Several nodes, started by the DeepSpeed launcher from an MPI-style hostfile
# (one line per node: `HOSTNAME slots=GPUS`). Two ways to start:
#
#   per node (no ssh needed; what launch/slurm.sbatch does): run this script on every
#   node with that node's rank (its line in the hostfile, from 0):
#     node0$ launch/multinode.sh --hostfile hosts --node-rank 0 --master-addr node0 --config C.yaml
#     node1$ launch/multinode.sh --hostfile hosts --node-rank 1 --master-addr node0 --config C.yaml
#   from the head node (passwordless ssh and pdsh on every node): run it once, without
#   --node-rank; DeepSpeed reaches every host of the hostfile over ssh.
#
# Options (any other --key value pair overrides that key of the YAML config):
#   --hostfile FILE     the hostfile (required)
#   --config FILE       experiment YAML (required)
#   --node-rank R       this node's line in the hostfile (default $NODE_RANK; unset: ssh mode)
#   --master-addr ADDR  address of node 0 reachable from every node (default $MASTER_ADDR,
#                       else the first hostfile entry)
#   --master-port PORT  rendezvous port (default $MASTER_PORT or 29500)
#   --ds-config FILE    DeepSpeed JSON (default: the config's own `deepspeed` key, if any)
#   --env-file FILE     KEY=VALUE lines exported to every rank of every node (e.g.
#                       NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, WANDB_API_KEY); per-node mode
#                       reads it on each node; the printed command shows its keys, never
#                       their values
# CUDA_VISIBLE_DEVICES, when set on a node in per-node mode, chooses that node's GPUs (passed
# to DeepSpeed as --include HOST:IDS; its count must equal the node's slots). output_dir
# must be on a file system every node sees (checkpoints are written by every rank).
#   --launcher NAME     ssh mode: pdsh (default) | openmpi | mvapich | mpich | impi;
#                       per-node mode: deepspeed (default) | torchrun (`torchrun --nnodes N
#                       --node_rank R`, static rendezvous: every node needs the same slots)
#   --dry-run           print the resolved command and exit
set -euo pipefail
source "$(dirname "$0")/_lib.sh"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

HOSTFILE="" CONFIG="" NODE_RANK_ARG="${NODE_RANK:-}" ADDR="${MASTER_ADDR:-}"
PORT="${MASTER_PORT:-29500}" DS_CONFIG="" ENV_FILE="" LAUNCHER=""
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) HOSTFILE="${2:-}"; shift 2 || die "--hostfile needs a file";;
        --config) CONFIG="${2:-}"; shift 2 || die "--config needs a file";;
        --node-rank) NODE_RANK_ARG="${2:-}"; shift 2 || die "--node-rank needs a number";;
        --master-addr) ADDR="${2:-}"; shift 2 || die "--master-addr needs an address";;
        --master-port) PORT="${2:-}"; shift 2 || die "--master-port needs a number";;
        --ds-config) DS_CONFIG="${2:-}"; shift 2 || die "--ds-config needs a file";;
        --env-file) ENV_FILE="${2:-}"; shift 2 || die "--env-file needs a file";;
        --launcher) LAUNCHER="${2:-}"; shift 2 || die "--launcher needs a name";;
        --dry-run) DRY_RUN=1; shift;;
        -h|--help) usage; exit 0;;
        *) OVERRIDES+=("$1"); shift;;
    esac
done

need_file "$HOSTFILE" "hostfile" "give --hostfile FILE with one 'HOSTNAME slots=N' line per node"
need_file "$CONFIG" "config" "give --config FILE.yaml (see configs/ and configs/experiments/)"
find_python
need_int "$PORT" "--master-port"

# ---- the hostfile: `HOST slots=N` lines, '#' comments, one line per host
HOSTS=() SLOTS=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    [[ -z "${line// /}" ]] && continue
    if [[ ! "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
        die "$HOSTFILE:$lineno: '$line' is not 'HOSTNAME slots=N'"
    fi
    host="${BASH_REMATCH[1]}" slots="${BASH_REMATCH[2]}"
    for seen in "${HOSTS[@]}"; do
        [[ "$seen" != "$host" ]] || die "$HOSTFILE:$lineno: host '$host' listed twice; \
DeepSpeed needs one line per node (to run two nodes on one machine, name it twice \
differently, e.g. localhost and 127.0.0.1)"
    done
    [[ "$slots" -ge 1 ]] || die "$HOSTFILE:$lineno: slots must be at least 1"
    HOSTS+=("$host") SLOTS+=("$slots")
done < "$HOSTFILE"
[[ ${#HOSTS[@]} -ge 1 ]] || die "$HOSTFILE lists no hosts: add 'HOSTNAME slots=N' lines"
TOTAL=0; for s in "${SLOTS[@]}"; do TOTAL=$((TOTAL + s)); done
ADDR="${ADDR:-${HOSTS[0]}}"
say "${#HOSTS[@]} node(s), $TOTAL process(es) in all; master $ADDR:$PORT"

DS_ARGS=() INCLUDE=()
if [[ -n "$DS_CONFIG" ]]; then
    check_ds_config "$DS_CONFIG"
    DS_ARGS=(--deepspeed "$DS_CONFIG")
fi
ENV=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}")
if [[ -n "$ENV_FILE" ]]; then
    need_file "$ENV_FILE" "env file" "give --env-file FILE with KEY=VALUE lines"
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ -z "${line// /}" || "$line" =~ ^[[:space:]]*# ]] && continue
        [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "$ENV_FILE: '$line' is not KEY=VALUE"
        ENV+=("$line")
        HIDDEN_KEYS+=("${line%%=*}")
    done < "$ENV_FILE"
fi
AVAILABLE="$(gpu_count)"

if [[ -n "$NODE_RANK_ARG" ]]; then
    # ---- per-node mode: this node starts its own processes
    need_int "$NODE_RANK_ARG" "--node-rank"
    [[ "$NODE_RANK_ARG" -lt ${#HOSTS[@]} ]] || die "--node-rank $NODE_RANK_ARG: the hostfile \
has ${#HOSTS[@]} node(s), ranks 0..$(( ${#HOSTS[@]} - 1 ))"
    LOCAL_SLOTS="${SLOTS[$NODE_RANK_ARG]}"
    if [[ "$AVAILABLE" -eq 0 ]]; then
        say "no GPU found: node $NODE_RANK_ARG (${HOSTS[$NODE_RANK_ARG]}) starts $LOCAL_SLOTS CPU \
process(es) (DS_ACCELERATOR=cpu, gloo)"
        ENV+=("DS_ACCELERATOR=cpu")
        unset CUDA_VISIBLE_DEVICES
    else
        [[ "$LOCAL_SLOTS" -le "$AVAILABLE" ]] || die "hostfile gives node $NODE_RANK_ARG \
(${HOSTS[$NODE_RANK_ARG]}) slots=$LOCAL_SLOTS but this node has $AVAILABLE usable GPU(s)"
        say "node $NODE_RANK_ARG (${HOSTS[$NODE_RANK_ARG]}): $LOCAL_SLOTS GPU process(es)"
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            # DeepSpeed's launcher numbers a node's GPUs 0..slots-1 unless told which
            [[ "$AVAILABLE" -eq "$LOCAL_SLOTS" ]] || die "CUDA_VISIBLE_DEVICES=\
$CUDA_VISIBLE_DEVICES gives $AVAILABLE GPU(s) but the hostfile gives node $NODE_RANK_ARG \
slots=$LOCAL_SLOTS; make them equal"
            INCLUDE=(--include "${HOSTS[$NODE_RANK_ARG]}:$CUDA_VISIBLE_DEVICES")
        fi
    fi
    [[ "$NODE_RANK_ARG" -ne 0 ]] || port_free 0.0.0.0 "$PORT" || die "master port $PORT is in \
use on node 0: give --master-port PORT with a free port"
    case "${LAUNCHER:-deepspeed}" in
        deepspeed) MODE=(--no_ssh --node_rank "$NODE_RANK_ARG" "${INCLUDE[@]}");;
        torchrun)
            for s in "${SLOTS[@]}"; do
                [[ "$s" -eq "$LOCAL_SLOTS" ]] || die "--launcher torchrun needs the same \
slots on every node (hostfile: ${SLOTS[*]}); use --launcher deepspeed for uneven nodes"
            done
            print_and_run "${ENV[@]}" -- "$PYTHON" -m torch.distributed.run \
                --nnodes "${#HOSTS[@]}" --node_rank "$NODE_RANK_ARG" \
                --nproc_per_node "$LOCAL_SLOTS" --master_addr "$ADDR" --master_port "$PORT" \
                -m attnrl.cli train --config "$CONFIG" "${DS_ARGS[@]}" "${OVERRIDES[@]}";;
        *) die "--launcher '$LAUNCHER' with --node-rank: choose deepspeed (default) or \
torchrun (pdsh and the MPI backends start all nodes from one, without --node-rank)";;
    esac
else
    # ---- ssh mode: DeepSpeed starts every node from here
    LAUNCHER="${LAUNCHER:-pdsh}"
    case "$LAUNCHER" in
        pdsh) BACKEND=pdsh;; openmpi) BACKEND=mpirun;; mvapich) BACKEND=mpirun_rsh;;
        mpich|impi) BACKEND=mpirun;;
        *) die "--launcher '$LAUNCHER': choose pdsh, openmpi, mvapich, mpich or impi";;
    esac
    command -v "$BACKEND" >/dev/null || die "'$BACKEND' (needed by --launcher $LAUNCHER) is \
not installed here: install it (with passwordless ssh to every host), or run this script on \
every node with --node-rank R"
    [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]] || say "CUDA_VISIBLE_DEVICES is set here but not \
applied: ssh mode starts every node with its hostfile slots (run per node with --node-rank \
to choose a node's GPUs)"
    # DeepSpeed forwards only a few variables to remote hosts, plus those of $DS_ENV_FILE
    FORWARD="$(mktemp "${TMPDIR:-/tmp}/attnrl_ds_env.XXXXXX")"
    printf '%s\n' "${ENV[@]}" > "$FORWARD"
    ENV+=("DS_ENV_FILE=$FORWARD")
    say "ssh mode: DeepSpeed ($LAUNCHER) starts the processes on every host of $HOSTFILE"
    MODE=(--launcher "$LAUNCHER")
fi

print_and_run "${ENV[@]}" -- "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" \
    "${MODE[@]}" --master_addr "$ADDR" --master_port "$PORT" --no_local_rank \
    --module attnrl.cli train --config "$CONFIG" "${DS_ARGS[@]}" "${OVERRIDES[@]}"
