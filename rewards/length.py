"""DAPO overlong shaping as a reward (docs/methods.md section 6).

With L_max the length cap and L_c the buffer, for a completion of |y| tokens:
    R = 0                              if |y| <= L_max - L_c
    R = ((L_max - L_c) - |y|) / L_c    if L_max - L_c < |y| <= L_max   (0 down to -1)
    R = -1                             if |y| > L_max
"""

from __future__ import annotations

from attnrl.errors import UserError

DEFAULT_BUFFER_FRACTION = 0.2   # L_c / L_max when no buffer is given (DAPO: 4096 / 20480)


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """R for one completion of `length` tokens (see module docstring)."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0


def _check(max_length, buffer) -> tuple[int, int]:
    if max_length is None:
        raise UserError("reward 'overlong' needs max_completion_length (L_max, in tokens): use "
                        "get_reward('overlong', max_completion_length=..., overlong_buffer=...)")
    max_length = int(max_length)
    if buffer is None:
        buffer = max(1, round(DEFAULT_BUFFER_FRACTION * max_length))
    buffer = int(buffer)
    if max_length < 1 or not 1 <= buffer <= max_length:
        raise UserError(f"overlong shaping needs max_completion_length >= 1 and "
                        f"1 <= overlong_buffer <= max_completion_length; got {max_length} and "
                        f"{buffer}")
    return max_length, buffer


def overlong_reward(prompts, completions, completion_lengths=None, completion_ids=None,
                    max_completion_length: int | None = None,
                    overlong_buffer: int | None = None, **columns) -> list[float]:
    """DAPO overlong shaping per completion. Lengths in tokens come from the column
    `completion_lengths` (ints) or `completion_ids` (token id lists)."""
    max_length, buffer = _check(max_completion_length, overlong_buffer)
    if completion_lengths is None and completion_ids is not None:
        completion_lengths = [len(ids) for ids in completion_ids]
    if completion_lengths is None:
        raise UserError("reward 'overlong' needs completion lengths in tokens: pass "
                        "completion_lengths=[...] or completion_ids=[[...], ...]")
    if len(completion_lengths) != len(completions):
        raise UserError(f"reward 'overlong': {len(completion_lengths)} lengths for "
                        f"{len(completions)} completions; give one per completion")
    return [overlong_penalty(int(n), max_length, buffer) for n in completion_lengths]
