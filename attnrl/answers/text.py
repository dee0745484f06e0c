"""Text of a completion and per-sample columns: what answer checks and rewards read."""

from __future__ import annotations

from typing import Any

from attnrl.errors import UserError


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or a conversation (list of {'role', 'content'}
    messages, as TRL passes for chat datasets) whose last message is the reply."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict) and "content" in last:
            return str(last["content"])
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"])
    raise UserError(f"completion of type {type(completion).__name__} is not text: pass strings "
                    "or lists of {'role', 'content'} messages")


def column(columns: dict, name: str, size: int, reward: str, fix: str) -> list:
    """Per-sample column `name` with exactly `size` entries, or a UserError saying how to
    supply it."""
    values = columns.get(name)
    if values is None:
        raise UserError(f"reward {reward!r} needs the per-sample column {name!r}: {fix}")
    values = list(values)
    if len(values) != size:
        raise UserError(f"reward {reward!r}: column {name!r} has {len(values)} entries for "
                        f"{size} completions; give one entry per completion")
    return values
