"""What the runs and the untrained reference are evaluated on: the held-out draw of the
base config (task seed + HELDOUT_SEED_OFFSET, none equivalent to a training problem) and
`attnrl eval` of a model on it."""

from __future__ import annotations

from pathlib import Path

from attnrl.evaluation import HELDOUT_SEED_OFFSET


def heldout_seed(config: dict) -> int:
    return int(config.get("task_seed", 0)) + HELDOUT_SEED_OFFSET


def heldout_draw(config: dict, eval_settings: dict):
    """The runs' held-out problems (attnrl.data.unseen.UnseenDraw): task seed +
    HELDOUT_SEED_OFFSET, none in the training pool; UserError when too few exist."""
    from trainers.heldout_keys import heldout_settings

    return heldout_settings({**config, "eval_size": eval_settings["num_problems"],
                             "eval_seed": heldout_seed(config)}).draw()


def reference_eval_args(config: dict) -> dict:
    """What the untrained reference is evaluated on: the trained runs' own held-out
    evaluation (trainers.heldout_keys.heldout_settings of the same config: its eval task,
    gsm8k -> gsm8k:test, eval_task for a JSONL task; its task kwargs only on the training
    task; seed task seed + HELDOUT_SEED_OFFSET; the training pool left out; the prompt
    format of training)."""
    from attnrl.data import DEFAULT_INSTRUCTION
    from trainers.heldout_keys import heldout_settings

    heldout = heldout_settings({**config, "eval_seed": heldout_seed(config)})
    return {"task": heldout.task, "seed": heldout.seed, "task_kwargs": heldout.task_kwargs,
            "instruction": DEFAULT_INSTRUCTION if heldout.instruction is None
            else heldout.instruction, "system_prompt": heldout.system_prompt,
            "pool": heldout.pool}


def evaluate_run(model_dir: Path, config: dict, settings: dict) -> dict:
    """`attnrl eval` of one checkpoint on the held-out problems the trained runs evaluate
    (`reference_eval_args`), greedy included."""
    from attnrl.evaluation import evaluate

    settings = {k: v for k, v in settings.items() if k != "every"}
    args = reference_eval_args(config)
    return evaluate([str(model_dir)], args.pop("task"), greedy=True, **args, **settings)
