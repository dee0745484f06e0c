"""reasoning-gym reward: the task's own scorer applied to the completion's answer.

Answer extraction, first rule that applies wins:
  1. the first non-empty line after the last '####' (attnrl.data's default instruction);
  2. the content of the last <answer>...</answer> (reasoning-gym's own prompt format);
  3. the rest of the line after the last 'Answer:' (case-insensitive);
  4. the last non-empty line; as models often end with a sentence ('The answer is 12.'),
     this rule tries three readings of that line and keeps the best score: the whole
     line, the text after its last 'is' / 'equals' / '=' / ':', and its last number.
The extracted text is stripped of surrounding whitespace, '**', '`' and a trailing '.'.
Columns: `entry` (the reasoning-gym entry) and `task` (its dataset name) per completion;
`metadata` (attnrl.data.PromptRecord.metadata: {'entry', 'task'}) works instead of both.
Without a task the entry's metadata['source_dataset'] names it. The score is the scorer's
float (1.0 correct, partial credit for some tasks, 0.0 wrong); scorer errors count 0.0.
"""

from __future__ import annotations

import re
from functools import cache

from attnrl.answers.text import completion_text
from attnrl.errors import UserError, nearest

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)
_LAST_LINK = re.compile(r"\b(?:is|equals)\b|=|:", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")


def _clean(text: str) -> str:
    return text.strip().strip("*`").strip().rstrip(".").strip()


def extract_gym_answer(text: str) -> str | None:
    """The answer a completion gives (rules 1-4 in the module docstring; for rule 4 the
    whole last line), or None."""
    candidates = gym_answer_candidates(text)
    return candidates[0] if candidates else None


def gym_answer_candidates(text: str) -> list[str]:
    """Readings of the completion's answer: one for rules 1-3, up to three for rule 4."""
    marked = _marked_answer(text)
    if marked is not None:
        return [marked]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    line = _clean(lines[-1])
    readings = [line]
    cuts = list(_LAST_LINK.finditer(line))
    if cuts:
        readings.append(_clean(line[cuts[-1].end():]))
    numbers = _NUMBER.findall(line)
    if numbers:
        readings.append(numbers[-1])
    return list(dict.fromkeys(r for r in readings if r))


def _marked_answer(text: str) -> str | None:
    idx = text.rfind("####")
    if idx >= 0:
        lines = [ln for ln in text[idx + 4:].lstrip("#").splitlines() if ln.strip()]
        if lines:
            return _clean(lines[0])
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return _clean(tags[-1])
    marks = list(_ANSWER_LINE.finditer(text))
    if marks:
        rest = text[marks[-1].end():].splitlines()
        if rest and rest[0].strip():
            return _clean(rest[0])
    return None


@cache
def scorer(task: str):
    """reasoning-gym's score_answer(answer, entry) -> float for a dataset name (cached)."""
    import reasoning_gym

    from attnrl.data import gym_task_names

    names = gym_task_names()
    if task not in names:
        raise UserError(f"reasoning-gym has no task {task!r}{nearest(task, names)}; pass the "
                        "dataset name the entry was generated from")
    return reasoning_gym.get_score_answer_fn(task)


def _task_and_entry(i: int, entry, task, metadata) -> tuple[str, dict]:
    meta = metadata[i] if metadata is not None else None
    e = entry[i] if entry is not None else (meta or {}).get("entry")
    if not isinstance(e, dict):
        raise UserError("reward 'gym' needs the reasoning-gym entry of each completion: pass "
                        "entry=[...] (and task=[...]) or metadata=[record.metadata, ...]")
    t = task[i] if task is not None else (meta or {}).get("task")
    t = t or (e.get("metadata") or {}).get("source_dataset")
    if not t:
        raise UserError("reward 'gym' cannot tell the task of an entry: pass task=[name, ...]")
    return str(t), e


def gym_reward(prompts, completions, entry=None, task=None, metadata=None,
               **columns) -> list[float]:
    """Score of each completion's answer by its reasoning-gym task's scorer."""
    if isinstance(task, str):  # one task for the whole batch
        task = [task] * len(completions)
    for name, values in (("entry", entry), ("task", task), ("metadata", metadata)):
        if values is not None and len(values) != len(completions):
            raise UserError(f"reward 'gym': column {name!r} has {len(values)} entries for "
                            f"{len(completions)} completions; give one per completion")
    scores = []
    for i, completion in enumerate(completions):
        name, e = _task_and_entry(i, entry, task, metadata)
        score_fn = scorer(name)
        scores.append(max([_score(score_fn, answer, e) for answer in
                           gym_answer_candidates(completion_text(completion))], default=0.0))
    return scores


def _score(score_fn, answer: str, entry: dict) -> float:
    try:
        return float(score_fn(answer, entry))
    except Exception:  # noqa: BLE001 - a scorer choking on an answer means it is wrong
        return 0.0
