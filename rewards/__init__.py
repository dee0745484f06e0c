"""Verifiable reward functions: reward(prompts, completions, **columns) -> list[float].

The answer checks (math, gym, answer: the task's correctness) live in the core,
attnrl.answers, which the evaluation and analysis commands use too; this package adds the
shaping rewards (format, overlong), the registry and the weighted mix.

Columns carry per-sample data, one entry per completion (as TRL passes dataset columns):
`answer` (gold final answer), `entry` / `task` / `metadata` (reasoning-gym),
`completion_lengths` or `completion_ids` (token lengths). Unused columns are ignored.

    REWARDS                      name -> reward function (callable as is)
    get_reward(name, **options)  that function with options bound (e.g. the overlong cap);
                                 a plug-in of your own by 'module:function' or
                                 'path/to/file.py:function' (rewards/plugins.py)
    combine_rewards({...})       weighted sum of several rewards
"""

from __future__ import annotations

import inspect
import math

from attnrl.answers import answer_reward
from attnrl.answers.gym_answer import extract_gym_answer, gym_reward
from attnrl.answers.math_answer import extract_math_answer, math_reward
from attnrl.errors import UserError, nearest
from rewards.base import RewardFn, completion_text
from rewards.format import DEFAULT_FORMAT_PATTERN, format_reward
from rewards.length import overlong_penalty, overlong_reward
from rewards.plugins import is_plugin, plugin_reward

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "gym": gym_reward,
    "answer": answer_reward,
    "format": format_reward,
    "overlong": overlong_reward,
}

_DATA_PARAMS = {"prompts", "completions", "answer", "entry", "task", "metadata",
                "completion_lengths", "completion_ids"}


def get_reward(name: str, **options) -> RewardFn:
    """The reward function `name`, with `options` (its keyword settings, e.g.
    max_completion_length for 'overlong', pattern for 'format') bound; a plug-in
    ('module:function' or 'path/to/file.py:function', rewards/plugins.py) is imported and
    checked."""
    if is_plugin(name):
        return plugin_reward(name, options)
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}{nearest(name, REWARDS)}; choose from "
                        f"{', '.join(REWARDS)}, or a plug-in 'module:function' / "
                        "'path/to/file.py:function'")
    fn = REWARDS[name]
    if not options:
        return fn
    allowed = [p for p in inspect.signature(fn).parameters
               if p not in _DATA_PARAMS and p != "columns"]
    for key in options:
        if key not in allowed:
            raise UserError(f"reward {name!r} has no option {key!r}{nearest(key, allowed)}; "
                            f"options: {', '.join(allowed) or 'none'}")

    def bound(prompts, completions, **columns):
        return fn(prompts, completions, **{**columns, **options})

    bound.__name__ = name
    bound.__doc__ = fn.__doc__
    return bound


def combine_rewards(weights, options: dict | None = None) -> RewardFn:
    """Weighted sum of rewards. `weights`: {name or function: weight} or a list of
    (name or function, weight) pairs; `options`: {name: {option: value}} for named ones."""
    pairs = list(weights.items()) if isinstance(weights, dict) else list(weights)
    if not pairs:
        raise UserError("combine_rewards needs at least one (reward, weight) pair")
    options = options or {}
    parts = []
    for reward, weight in pairs:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"weight of reward {reward!r} must be a finite number, got "
                            f"{weight!r}")
        if isinstance(reward, str):
            name, fn = reward, get_reward(reward, **options.get(reward, {}))
        else:
            name, fn = getattr(reward, "__name__", repr(reward)), reward
        parts.append((name, fn, float(weight)))

    def combined(prompts, completions, **columns):
        total = [0.0] * len(completions)
        for _, fn, weight in parts:
            for i, value in enumerate(fn(prompts, completions, **columns)):
                total[i] += weight * value
        return total

    combined.__name__ = "+".join(f"{w:g}*{name}" for name, _, w in parts)
    combined.components = [(name, w) for name, _, w in parts]
    return combined


__all__ = [
    "DEFAULT_FORMAT_PATTERN",
    "REWARDS",
    "RewardFn",
    "answer_reward",
    "combine_rewards",
    "completion_text",
    "extract_gym_answer",
    "extract_math_answer",
    "format_reward",
    "get_reward",
    "gym_reward",
    "math_reward",
    "overlong_penalty",
    "overlong_reward",
]
