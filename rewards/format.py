"""Format reward: 1.0 when the completion contains the required answer marker."""

from __future__ import annotations

import re
from functools import lru_cache

from attnrl.answers.text import completion_text
from attnrl.errors import UserError

# '####' followed by a value, or a \boxed{ ... }
DEFAULT_FORMAT_PATTERN = r"####[ \t]*[^\s#]|\\boxed\s*\{"


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"format reward pattern {pattern!r} is not a valid regular expression "
                        f"({err}); fix the pattern option") from None


def format_reward(prompts, completions, pattern: str = DEFAULT_FORMAT_PATTERN,
                  **columns) -> list[float]:
    """1.0 for each completion in which `pattern` (a regex, searched anywhere) matches."""
    regex = _compile(pattern)
    return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]
