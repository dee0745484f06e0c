"""The ablation's fixed settings: strategies, the baseline and the positive control, the
budget presets (training overrides, held-out evaluation, seeds, target reward)."""

from __future__ import annotations

import json

from trainers.ablation.registered import CONTROL

DEFAULT_STRATEGIES = ("uniform", "coupled", "random", CONTROL)


BASELINE = "uniform"


POSITIVE_CONTROL = CONTROL  # uniform at half the learning rate (trainers/ablation/registered.py)


POSITIVE_CONTROL_LABEL = "positive control (expected: lower AUC than uniform, predicted below)"


CONTROL_DIRECTION = -1  # expected sign of (control - uniform) on final accuracy and area


DEFAULT_TARGET_HALF_WIDTH = 5.0  # points: the half-width seeds are estimated for [D]


SEQUENTIAL_MIN_SEEDS = 5  # --until-half-width stops no earlier [D]: stopping on a narrow


#   interval after 3 seeds lets the 95% interval miss 0 in up to 7.7% of null ablations; from
#   5 seeds on, 4.9-5.6% (simulated: tests/trainers/test_ablation.py)
ABLATION_FORMAT = 2  # ablation.json of format 1 (pooled intervals; held-out set that


#   overlapped the training pool) are refused: those runs are not mixed with new ones
METRIC_TEXT = {"final": "final accuracy", "auc": "area under curve"}


INTERVAL_TEXT = ("95% t interval over seeds of paired differences (the seed is the unit: same "
                 "seed = same data order, rollout seeds and held-out problems; no interval "
                 "pools problems across seeds; the intervals are not corrected for "
                 "multiplicity, the secondary tests below are: Holm)")


CENSORING_TEXT = ("steps to target: a run that never reached the target reward by max_steps "
                  "is censored: it counts in 'reached k/n' and ranks last in the median, never "
                  "as a number; the steps interval uses only the pairs where both runs "
                  "reached it (count shown), the earlier/later/tied/neither counts every pair")


PRIMARY_METRIC = "greedy_accuracy"


SMOOTH_WINDOW = 5  # steps-to-target uses the trailing 5-step average of the training reward


# Budget presets: config overrides of the training job, held-out evaluation (problems,
# samples per problem for pass@k, token cap, engine, learning-curve interval `every`), seeds,
# and the training reward whose first crossing is reported (`target_reward`).
# tiny: tests (a random tiny model; a format reward gives every group a reward spread).
# cpu: SmolLM2-135M full fine-tune on 2 CPU cores, the main job's recipe and task
#   (configs/default.yaml: its task, task_size and held-out problems, none in the training
#   pool; its learning rate, 4 prompts x 8 samples, 64 tokens, 16 steps). Micro-batches of 8
#   (4 accumulated) keep the peak near 6 GB. One thread per run (OMP_NUM_THREADS=1): ~17 min
#   per run alone, 13-15 min each with --workers 2 on 2 idle cores (two at a time, one core
#   each): the 41 runs of 4 strategies x 10 seeds in about 5 h.
# medium / large: GPU nodes.
BUDGETS = {
    "tiny": {
        "train": {"task_size": 8, "max_steps": 2, "save_steps": 1, "num_generations": 2,
                  "per_device_train_batch_size": 4, "max_completion_length": 8,
                  "rollout_engine": "hf", "report_to": "none", "learning_rate": 1e-3,
                  "signal_h_lo": 2, "signal_h_hi": 8, "signal_window": 4,
                  "gradient_checkpointing": False, "rewards": {"format": 1.0},
                  "reward_options": {"format": {"pattern": "[A-Z]"}}, "instruction": ""},
        "eval": {"num_problems": 3, "n": 2, "max_tokens": 8, "engine": "hf", "every": 1},
        "seeds": [0],
        "target_reward": 0.5,
    },
    "cpu": {
        "train": {"max_steps": 16, "save_steps": 4, "save_total_limit": 1,
                  "num_generations": 8, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 4, "max_completion_length": 64,
                  "gradient_checkpointing": False,
                  "rollout_engine": "vllm", "report_to": "none",
                  "lr_scheduler_type": "constant", "beta": 0.0, "instruction": ""},
        "eval": {"num_problems": 107, "n": 2, "max_tokens": 64, "engine": "vllm", "every": 4},
        "seeds": list(range(10)),   # 80% power at 3 AUC points (plan: benchmarks/results/
        #   credit_ablation_cpu_v3/PLAN.md)
        "target_reward": 0.4,
    },
    "medium": {
        "train": {"task_size": 2048, "max_steps": 200, "save_steps": 50,
                  "save_total_limit": 1, "num_generations": 8,
                  "per_device_train_batch_size": 64, "max_completion_length": 256,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 256, "n": 8, "max_tokens": 256, "engine": "vllm",
                 "every": 25},
        "seeds": [0, 1, 2],
        "target_reward": 0.5,
    },
    "large": {
        "train": {"task_size": 8192, "max_steps": 1000, "save_steps": 100,
                  "save_total_limit": 1, "num_generations": 16,
                  "per_device_train_batch_size": 128, "max_completion_length": 512,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 1024, "n": 16, "max_tokens": 512, "engine": "vllm",
                 "every": 100},
        "seeds": [0, 1, 2],
        "target_reward": 0.5,
    },
}


EVAL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}  # those of `attnrl eval`



def flatten_settings(settings: dict) -> dict:
    """{'eval': {'n': 4}} -> {'eval.n': 4}; base_config keys keep their own names."""
    flat = {}
    for key, value in json.loads(json.dumps(settings, default=str)).items():
        if key in ("base_config", "eval"):
            prefix = "" if key == "base_config" else "eval."
            flat.update({prefix + k: v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
