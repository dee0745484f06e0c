#!/usr/bin/env bash
# One prepared script for a lent GPU machine (device tool `run`, about 10 minutes):
#
#   bash benchmarks/gpu_session.sh "$OUT"          # from the repository root
#
# 1. the GPU install (make install-gpu: requirements/constraints-gpu.txt), timed;
# 2. the tiny job with vLLM colocated on the GPU (configs/tiny.yaml, 2 steps, bf16);
# 3. a 2-step main job (configs/default.yaml --max_steps 2, 16 held-out problems);
# 4. benchmarks/gpu_check.sh (the signal capture's CUDA path and its benchmark).
# Everything it prints goes to OUT/*.log; commit OUT as benchmarks/results/gpu_<device>/.
# Each step has its own time limit and a failed step does not stop the next.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
status=0
step() {  # step NAME SECONDS COMMAND...: run, log, keep going
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))" | tee -a "$OUT/steps.log"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc" | tee -a "$OUT/steps.log"
    [[ $rc -eq 0 ]] || status=1
    tail -n 5 "$OUT/$name.log"
}
nvidia-smi > "$OUT/nvidia-smi.log" 2>&1 || echo "no nvidia-smi: not a GPU machine" | tee -a "$OUT/steps.log"
step install 420 make install-gpu
step tiny_model 120 .venv/bin/python -c "from attnrl.models import save_tiny_model; save_tiny_model('$OUT/tiny_model')"
step tiny_job 240 .venv/bin/attnrl train --config configs/tiny.yaml --model "$OUT/tiny_model" \
    --output_dir "$OUT/tiny" --rollout_engine vllm --max_steps 2 --report_to none
step main_job_2_steps 300 .venv/bin/attnrl train --output_dir "$OUT/main2" --max_steps 2 \
    --eval_size 16 --report_to none
step gpu_check 360 env PYTHON=.venv/bin/python PYTHONPATH=. bash benchmarks/gpu_check.sh "$OUT/gpu_check"
rm -rf "$OUT/tiny/final" "$OUT/main2/final" "$OUT"/*/checkpoint-* "$OUT/tiny_model"
echo "gpu_session: exit status $status" | tee -a "$OUT/steps.log"
exit $status
