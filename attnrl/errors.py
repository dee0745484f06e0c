"""One exception type for bad input: its message names the problem and the fix."""

import difflib


class UserError(ValueError):
    """Bad input from the user (path, name, config key, data). The CLI prints it on one line
    and exits with code 2."""


def nearest(name: str, choices) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
