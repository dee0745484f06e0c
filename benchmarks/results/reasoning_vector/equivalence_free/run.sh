#!/bin/bash
# Reasoning vectors re-measured on the main job's 107 equivalence-free held-out problems:
# the main job's trained model (outputs/default/final: configs/default.yaml, seed 0), merged
# onto the untrained SmolLM2 at alpha 0.5 and 1.5 (target = sft = start, so the merge is
# start + alpha x (trained - start)), all four models evaluated by `attnrl eval --config`
# on the config's held-out draw (greedy + 2 samples at T = 0.6, 64 tokens).
set -e
cd "$(dirname "$0")/../../../.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0
OUT=benchmarks/results/reasoning_vector/equivalence_free
for a in 0.5 1.5; do
  [ -d outputs/rv_alpha$a ] || .venv/bin/attnrl merge --rl outputs/default/final --sft smollm2 \
      --target smollm2 --alpha $a --out outputs/rv_alpha$a
done
.venv/bin/attnrl eval --config configs/default.yaml --model smollm2 --model outputs/default/final \
    --model outputs/rv_alpha0.5 --model outputs/rv_alpha1.5 --greedy --out $OUT/eval
