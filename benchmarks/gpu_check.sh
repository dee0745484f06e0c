#!/usr/bin/env bash
# GPU check of the signal capture (one CUDA GPU; torch + transformers only, no network).
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh OUTDIR      # from the repository root
#
# 1. benchmarks/gpu_signals_check.py: the CUDA statistics kernel and a bf16 model in a
#    checkpointed training forward against the float64 definition; gradients vs sdpa.
# 2. benchmarks/signals.py on CUDA, bf16 weights, SmolLM2-135M's shape with random weights,
#    N = 4096, 8192, 16384: every capture path against its plain forward, time and memory.
# Writes OUTDIR/gpu_signals_check.json, OUTDIR/signals_cuda_bf16.json and the logs.
# About 2-4 minutes on an H200; each step has its own time limit.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')" \
    || { echo "torch and transformers must be importable"; exit 2; }
status=0
timeout 150 "$PY" benchmarks/gpu_signals_check.py --out "$OUT/gpu_signals_check.json" \
    2>&1 | tee "$OUT/gpu_signals_check.log" || status=1
timeout 200 "$PY" benchmarks/signals.py --device cuda --dtype bfloat16 --model smollm2-shape \
    --lengths 4096 8192 16384 --reps 3 \
    --modes plain capture portable ckpt_plain ckpt_capture autocast_plain autocast_capture \
    --out "$OUT/signals_cuda_bf16.json" 2>&1 | tee "$OUT/signals_cuda_bf16.log" || status=1
echo "gpu_check: exit status $status (0 = every step ran and every check passed)"
exit $status
