"""The reward-function type; the text and column helpers live in attnrl.answers.text (the
answer checks of the core read them too)."""

from __future__ import annotations

from collections.abc import Callable

from attnrl.answers.text import column, completion_text  # noqa: F401  (rewards use them)

# reward(prompts, completions, **columns) -> one float per completion
RewardFn = Callable[..., list[float]]
