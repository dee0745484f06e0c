"""Math answer reward: 1.0 when the completion's final answer equals the gold answer.

Final answer extraction, first rule that applies wins:
  1. the content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced;
  2. the first non-empty line after the last '####' (the marker the default instruction of
     attnrl.data asks for, and GSM8K's own solutions use);
  3. the last plain number in the text (sign, thousands commas, decimals and a/b allowed).
Comparison: when both the answer and the gold are plain numbers (after removing '$',
thousands commas, a trailing '.'), they are compared exactly as rationals (fast path, no
parsing). Otherwise both go through math-verify (`parse`, `verify`), which handles LaTeX,
fractions, units text and equivalent expressions.

math-verify bounds its work with SIGALRM, which only works in the main thread; in any
other thread the timeout is switched off and answers longer than `MAX_ANSWER_CHARS` are
scored 0 without parsing, so worker threads neither raise nor hang on huge inputs.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache

from attnrl.answers.text import column, completion_text

MAX_ANSWER_CHARS = 512   # longer extracted answers score 0 (never parsed)
TIMEOUT_SECONDS = 5      # math-verify parse/verify limit, main thread only

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w])")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces, or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[start:pos].strip()
    return None


def after_marker(text: str, marker: str = "####") -> str | None:
    """First non-empty line after the last `marker`, or None."""
    idx = text.rfind(marker)
    if idx < 0:
        return None
    for line in text[idx + len(marker):].lstrip("#").splitlines():
        if line.strip():
            return _clean(line)
    return None


def last_number(text: str) -> str | None:
    """The last plain number in the text (as written, commas kept), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_math_answer(text: str) -> tuple[str | None, str | None]:
    """(answer, rule) with rule in {'boxed', '####', 'number'}; (None, None) if none."""
    for rule, finder in (("boxed", last_boxed), ("####", after_marker), ("number", last_number)):
        answer = finder(text)
        if answer:
            return answer, rule
    return None, None


def _clean(text: str) -> str:
    return text.strip().strip("*`").strip().rstrip(".").strip()


def as_number(text: str) -> Fraction | None:
    """A plain number ('-1,234.50', '$18', '3/4', '72.') as an exact rational, else None."""
    text = text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    text = _THOUSANDS.sub("", _clean(text))
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _parse(text: str, wrap: bool) -> list:
    from math_verify import parse

    try:
        return parse(f"${text}$" if wrap else text, parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001 - math-verify can raise on malformed LaTeX
        return []


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    has_math = "$" in gold or "\\boxed" in gold
    return _parse(gold, wrap=not has_math) or _parse(gold, wrap=has_math)


def answers_match(answer: str, gold: str, rule: str | None = None) -> bool:
    """Whether an extracted answer equals the gold answer (see module docstring)."""
    answer, gold = answer.strip(), str(gold).strip()
    if not answer or not gold or len(answer) > MAX_ANSWER_CHARS:
        return False
    a_num, g_num = as_number(answer), as_number(gold)
    if a_num is not None and g_num is not None:
        return a_num == g_num
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if rule == "boxed":
        answer_parsed = _parse(f"\\boxed{{{answer}}}", wrap=False)
    else:
        answer_parsed = _parse(answer, wrap=False) or _parse(answer, wrap=True)
    if not gold_parsed or not answer_parsed:
        return _clean(answer) == _clean(gold)
    try:
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001 - a verifier failure is a wrong answer
        return False


def math_reward(prompts, completions, answer=None, **columns) -> list[float]:
    """1.0 if a completion's final answer equals its gold answer (column `answer`), else 0.0."""
    golds = column({"answer": answer}, "answer", len(completions), "math",
                   "pass answer=[gold final answer per completion]")
    scores = []
    for completion, gold in zip(completions, golds):
        extracted, rule = extract_math_answer(completion_text(completion))
        ok = extracted is not None and gold is not None and answers_match(extracted, gold, rule)
        scores.append(1.0 if ok else 0.0)
    return scores
