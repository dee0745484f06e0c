"""Checks of single values: the `check=` functions of the key declarations
(trainers/schema_declarations.py), each fn(value) -> problem text or None, for what a
key's kinds, choices and range cannot say (reward names and weights, LoRA settings, the
resume target, ...); and check_paths, the check of the model and the task on disk that a
job runs when it starts. Rules between several keys: trainers/schema_rules.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from attnrl.cli_checks import model_problem
from attnrl.errors import UserError, nearest
from trainers.schema_key import BadValue, Key, coerce
from trainers.schema_names import LORA_ALIASES, LORA_KEYS, REPORT_TO, REWARDS


def engine_default(expected):
    """A sampling option attnrl's engines do not apply: only its neutral value is accepted
    (anything else would be silently ignored, and the log-probs would not match)."""
    def check(value) -> str | None:
        if value != expected:
            return ("would be ignored: attnrl's rollout engines sample with temperature and "
                    "top_p only")
        return None
    return check


def reasoning_vector_problem(value) -> str | None:
    from trainers.heldout_keys import vector_settings

    try:
        vector_settings({"reasoning_vector": value})
    except UserError as err:
        return str(err)
    return None


def _reward_name_problem(name, key: str) -> str | None:
    """Why `name` is neither a registered reward nor written as a plug-in (nothing is
    imported here: a plug-in is imported when the job starts, trainers/preflight.py)."""
    from rewards.plugins import is_plugin, spec_problem

    if is_plugin(name):
        problem = spec_problem(name)
        return f"{key} {problem}" if problem else None
    if name not in REWARDS:
        return (f"unknown reward {name!r}{nearest(name, REWARDS)}; registered: "
                f"{', '.join(REWARDS)}; or a plug-in 'module:function' / "
                "'path/to/file.py:function'")
    return None


def rewards_problem(value) -> str | None:
    if not value:
        return "needs at least one reward"
    for name, weight in value.items():
        problem = _reward_name_problem(name, "rewards")
        if problem:
            return problem
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not math.isfinite(weight):
            return f"the weight of reward {name!r} is {weight!r}, not a finite number"
    return None


def reward_options_problem(value) -> str | None:
    for name, options in value.items():
        problem = _reward_name_problem(name, "reward_options")
        if problem:
            return problem
        if not isinstance(options, dict):
            return f"the options of reward {name!r} must be a mapping, got {options!r}"
    return None


def lora_problem(value) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        return "is not a mapping"
    for name, item in value.items():
        if name not in LORA_KEYS:
            hint = f" (did you mean {LORA_ALIASES[name]!r}?)" if name in LORA_ALIASES \
                else nearest(name, LORA_KEYS)
            return (f"unknown lora key {name!r}{hint}; lora keys: "
                    f"{', '.join(LORA_KEYS)}")
        kinds, extra = LORA_KEYS[name]
        sub = Key(f"lora.{name}", kinds, None, "", **extra)
        try:
            coerce(sub, item)
        except BadValue as bad:
            return f"lora.{name} = {item!r} {bad.problem}; lora.{name} takes {sub.describe()}"
    return None


def resume_problem(value) -> str | None:
    if isinstance(value, bool) or value in ("auto", "never"):  # true: auto, false: never
        return None
    path = Path(str(value))
    if not path.is_dir():
        return f"is not an existing directory{nearest(value, ('auto', 'never'))}"
    return None


def check_paths(config: dict) -> None:
    """UserError unless the model ('smollm2' or a saved model directory) and a file task
    exist. A job checks this when it starts, not when a config loads: shipped configs name
    models and data that exist only on training nodes."""
    for name, check in (("model", model_problem), ("task", task_problem)):
        problem = check(config[name])
        if problem:
            raise UserError(f"{name} {str(config[name])!r} {problem}")


def task_problem(value) -> str | None:
    from attnrl.data.files import is_data_path, source_problem

    text = str(value)
    if text == "gsm8k" or text.startswith("gsm8k:"):
        split = text.partition(":")[2] or "train"
        return None if split in ("train", "test") else \
            f"has no split {split!r}{nearest(split, ('train', 'test'))}; use gsm8k:train or gsm8k:test"
    if is_data_path(text):
        return source_problem(text)
    return None  # a reasoning-gym name: checked with "did you mean" when the data loads


def field_name_problem(value) -> str | None:
    return None if str(value).strip() else "is empty; give the name of a field"


def reward_aggregation_problem(value) -> str | None:
    if value == "sum_then_normalize":
        return None
    return (f"multi_objective_aggregation {value!r} is not supported: attnrl's advantage "
            "estimators take the weighted sum of the rewards ('sum_then_normalize'); remove "
            "the key or set it to 'sum_then_normalize'")


def max_steps_problem(value) -> str | None:
    return None if value == -1 or value >= 1 else "is out of range"


def report_to_problem(value) -> str | None:
    names = [value] if isinstance(value, str) or value is None else list(value)
    for name in names:
        if name is not None and name not in REPORT_TO:
            return f"names unknown reporter {name!r}{nearest(name, REPORT_TO)}"
    return None

