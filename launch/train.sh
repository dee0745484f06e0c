#!/usr/bin/env bash
# One node, N processes (one per GPU), started by the DeepSpeed launcher.
#
#   launch/train.sh --config configs/experiments/qwen3-4b-base_math-1k_coupled.yaml --gpus 8
#   launch/train.sh --config configs/tiny.yaml --gpus 2 \
#       --ds-config configs/deepspeed/zero2.json --model outputs/tiny_model --max_steps 2
#
# Options (any other --key value pair overrides that key of the YAML config):
#   --config FILE       experiment YAML (required)
#   --gpus N            processes to start (default: every visible GPU; on a machine
#                       without GPUs: N CPU processes, default 1)
#   --ds-config FILE    DeepSpeed JSON (configs/deepspeed/*.json); default: the config's own
#                       `deepspeed` key, or plain data-parallel training without one
#   --master-port PORT  rendezvous port (default $MASTER_PORT or 29500)
#   --dry-run           print the resolved command and exit
# Without GPUs the DeepSpeed launcher starts CPU processes (DS_ACCELERATOR=cpu; the
# processes talk over gloo): the same code path, for tests and small runs.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

CONFIG="" GPUS="" DS_CONFIG="" PORT="${MASTER_PORT:-29500}"
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2:-}"; shift 2 || die "--config needs a file";;
        --gpus) GPUS="${2:-}"; shift 2 || die "--gpus needs a number";;
        --ds-config) DS_CONFIG="${2:-}"; shift 2 || die "--ds-config needs a file";;
        --master-port) PORT="${2:-}"; shift 2 || die "--master-port needs a number";;
        --dry-run) DRY_RUN=1; shift;;
        -h|--help) usage; exit 0;;
        --gpu|--num-gpus|--num_gpus|--nproc_per_node|--nproc-per-node)
            die "$1 is not an option of launch/train.sh (it would reach attnrl as a config \
key): did you mean --gpus N?";;
        --ds_config) die "--ds_config: did you mean --ds-config FILE?";;
        --master_port) die "--master_port: did you mean --master-port N?";;
        *) OVERRIDES+=("$1"); shift;;
    esac
done

need_file "$CONFIG" "config" "give --config FILE.yaml (see configs/ and configs/experiments/)"
find_python
need_int "$PORT" "--master-port"
port_free 127.0.0.1 "$PORT" || die "master port $PORT is in use on this node: give \
--master-port PORT (or MASTER_PORT=...) with a free port"
DS_ARGS=()
if [[ -n "$DS_CONFIG" ]]; then
    check_ds_config "$DS_CONFIG"
    DS_ARGS=(--deepspeed "$DS_CONFIG")
fi

ENV=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}")
RESOURCES=()
AVAILABLE="$(gpu_count)"
if [[ "$AVAILABLE" -eq 0 ]]; then
    GPUS="${GPUS:-1}"
    need_int "$GPUS" "--gpus"
    [[ "$GPUS" -ge 1 ]] || die "--gpus must be at least 1"
    say "no GPU found: starting $GPUS CPU process(es) with the DeepSpeed launcher \
(DS_ACCELERATOR=cpu, gloo)"
    ENV+=("DS_ACCELERATOR=cpu")
    unset CUDA_VISIBLE_DEVICES
    RESOURCES=(--num_gpus "$GPUS")
else
    GPUS="${GPUS:-$AVAILABLE}"
    need_int "$GPUS" "--gpus"
    [[ "$GPUS" -ge 1 && "$GPUS" -le "$AVAILABLE" ]] || die "--gpus $GPUS: this node has \
$AVAILABLE usable GPU(s)${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        # let DeepSpeed map the visible devices itself (it ignores them with --num_gpus)
        IFS=',' read -r -a IDS <<< "$CUDA_VISIBLE_DEVICES"
        ENV+=("CUDA_VISIBLE_DEVICES=$(IFS=','; echo "${IDS[*]:0:$GPUS}")")
    else
        RESOURCES=(--num_gpus "$GPUS")
    fi
    say "$GPUS GPU process(es) on this node"
fi
if [[ ${#DS_ARGS[@]} -eq 0 ]]; then
    say "no --ds-config: DeepSpeed settings come from the config's 'deepspeed' key, if any"
fi

# --hostfile /dev/null: one node, whatever a stray /job/hostfile says
print_and_run "${ENV[@]}" -- "$PYTHON" -m deepspeed.launcher.runner --hostfile /dev/null \
    "${RESOURCES[@]}" --master_port "$PORT" --no_local_rank \
    --module attnrl.cli train --config "$CONFIG" "${DS_ARGS[@]}" "${OVERRIDES[@]}"
