"""Answer checking: is a completion's final answer the task's gold answer? The core's notion
of correctness, used by the evaluation, analysis and fidelity commands and wrapped by the
`rewards` package as the math / gym / answer rewards.

    math_answer.py  final answer extraction and exact / math-verify comparison (GSM8K, JSONL)
    gym_answer.py   reasoning-gym's own scorers on the extracted answer
    text.py         a completion's text (string or chat messages), per-sample columns

Each check has the reward signature: check(prompts, completions, **columns) -> list[float],
1.0 correct, 0.0 wrong (reasoning-gym may give partial credit).
"""

from __future__ import annotations

from attnrl.answers.gym_answer import gym_reward
from attnrl.answers.math_answer import math_reward


def answer_reward(prompts, completions, answer=None, entry=None, task=None, metadata=None,
                  **columns) -> list[float]:
    """Correctness per completion: the reasoning-gym scorer where the sample carries a
    reasoning-gym entry (column `entry`, or `metadata` with one), else the math reward
    against `answer`."""
    scores = []
    for i, completion in enumerate(completions):
        meta = metadata[i] if metadata is not None else {}
        has_entry = (entry is not None and entry[i] is not None) or "entry" in (meta or {})
        if has_entry:
            scores += gym_reward(
                [prompts[i] if prompts else ""], [completion],
                entry=[entry[i]] if entry is not None else None,
                task=[task[i]] if task is not None and not isinstance(task, str) else task,
                metadata=[meta] if metadata is not None else None)
        else:
            scores += math_reward([""], [completion],
                                  answer=[answer[i]] if answer is not None else None)
    return scores


__all__ = ["answer_reward", "gym_reward", "math_reward"]
