"""One exception type for bad input: its message names the problem and the fix."""

import difflib


class UserError(ValueError):
    """Bad input from the user (path, name, config key, data). The CLI prints it on one line
    and exits with code 2."""


def nearest(name: str, choices) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal (SIGINT / SIGTERM). The CLI prints `message` on one line
    (nothing when `reported`: the line was printed already) and exits with `code`,
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = "", reported: bool = False):
        super().__init__(message)
        self.signum, self.message, self.reported = int(signum), message, reported
        self.code = 128 + int(signum)
