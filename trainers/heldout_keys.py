"""Held-out evaluation and reasoning-vector job keys: parsed and checked here, without
heavy imports (trainers/schema_declarations.py declares each key's type and default;
trainers/schema_checks.py and trainers/schema_rules.py call the checks here). `None` means the documented default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnrl.data import file_options, is_file_task
from attnrl.data.unseen import TrainingPool
from attnrl.errors import UserError
from attnrl.evaluation import HELDOUT_SEED_OFFSET

EVAL_TOP_P = 0.95
HELDOUT_INPUTS = ("eval_size", "eval_task", "eval_seed", "eval_samples", "eval_temperature",
                  "eval_max_tokens", "eval_before", "eval_after", "eval_every", "task",
                  "task_size", "task_seed", "task_kwargs", "question_field", "answer_field",
                  "instruction", "system_prompt", "max_completion_length")
"""The config keys `heldout_settings` reads."""


@dataclass
class HeldoutSettings:
    size: int
    task: str
    seed: int
    samples: int
    temperature: float
    max_tokens: int
    before: bool
    after: bool
    every: int
    task_kwargs: dict
    instruction: str | None
    system_prompt: str | None
    pool: TrainingPool
    """The job's training pool: held-out problems are never among its questions."""
    fields: dict = field(default_factory=dict)
    """A data file's field mapping (question_field, answer_field; attnrl.data.file_options)."""

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def draw(self):
        """The held-out problems (attnrl.data.unseen.UnseenDraw): the first `size` distinct
        problems of the evaluation task whose questions are not in the training pool; a
        UserError when there are fewer. Generates prompts only (no model)."""
        from attnrl.data.unseen import draw_unseen

        return draw_unseen(self.task, self.size, self.seed,
                           {**self.task_kwargs, **self.fields}, self.pool)


@dataclass
class VectorSettings:
    target: str
    alpha: float
    sft: str | None
    out: str | None


def _int(config, key, default, low):
    value = config.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key} must be an integer >= {low}; got {value!r}")
    return value


def _bool(config, key, default):
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false; got {value!r}")
    return value


def heldout_settings(config: dict) -> HeldoutSettings:
    """The held-out evaluation of a flat job config (raises UserError on a bad value)."""
    size = _int(config, "eval_size", 0, 0)
    task = str(config.get("task", "chain_sum"))
    task_seed = int(config.get("task_seed") or 0)
    eval_task = config.get("eval_task")
    if eval_task is None:
        if task in ("gsm8k", "gsm8k:train"):
            eval_task = "gsm8k:test"
        elif is_file_task(task) and size:
            raise UserError(f"eval_size {size} with the file task {task!r}: give eval_task "
                            "(a held-out data file or gsm8k:test), or eval_size: 0")
        else:
            eval_task = task
    eval_task = str(eval_task)
    # any seed is allowed: held-out problems are kept apart from training by question text
    seed = _int(config, "eval_seed", task_seed + HELDOUT_SEED_OFFSET, -2**31)
    temperature = config.get("eval_temperature")
    temperature = 0.6 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise UserError(f"eval_temperature must be a number > 0; got {temperature!r}")
    max_tokens = _int(config, "eval_max_tokens",
                      int(config.get("max_completion_length") or 256), 1)
    return HeldoutSettings(
        size=size, task=eval_task, seed=seed, samples=_int(config, "eval_samples", 4, 1),
        temperature=float(temperature), max_tokens=max_tokens,
        before=_bool(config, "eval_before", True), after=_bool(config, "eval_after", True),
        every=_int(config, "eval_every", 0, 0),
        task_kwargs=dict(config.get("task_kwargs") or {}) if eval_task == task else {},
        instruction=config.get("instruction"), system_prompt=config.get("system_prompt"),
        pool=TrainingPool.from_config({**config, "task_size": _int(config, "task_size", 64, 1)}),
        fields=file_options(config, eval_task))


def vector_settings(config: dict) -> VectorSettings | None:
    """The `reasoning_vector` mapping of a job config, or None."""
    value = config.get("reasoning_vector")
    if value in (None, False):
        return None
    if not isinstance(value, dict) or "target" not in value:
        raise UserError("reasoning_vector must be a mapping with at least target: DIR, e.g. "
                        "{target: smollm2, alpha: 0.5}")
    unknown = set(value) - {"target", "alpha", "sft", "out"}
    if unknown:
        raise UserError(f"reasoning_vector has unknown keys {sorted(unknown)}; valid: target, "
                        "alpha, sft, out")
    alpha = value.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise UserError(f"reasoning_vector.alpha must be a number; got {alpha!r}")
    return VectorSettings(target=str(value["target"]), alpha=float(alpha),
                          sft=None if value.get("sft") is None else str(value["sft"]),
                          out=None if value.get("out") is None else str(value["out"]))


def validate(config: dict) -> None:
    """Check every key of this feature (called by trainers.job.validate_config)."""
    heldout_settings(config)
    vector_settings(config)
