"""Prompt datasets: reasoning-gym tasks and JSONL files, turned into prompt records.

A `PromptRecord` carries the text fed to the model (chat template applied when the
tokenizer has one), the gold answer, and whatever a reward function needs (`metadata`:
for reasoning-gym, the task entry so that its own scorer can be used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnrl.errors import UserError, nearest

DEFAULT_INSTRUCTION = "Think briefly, then give the final answer after '####'."

# GSM8K ships with the package (MIT, LICENSE beside the files): "gsm8k" / "gsm8k:train" and
# "gsm8k:test" name its splits wherever a task or a JSONL path is accepted.
GSM8K_DIR = Path(__file__).parent / "gsm8k"
GSM8K_SPLITS = ("train", "test")


def gsm8k_path(split: str = "test") -> Path:
    """Path of the bundled GSM8K split ('train': 7473 problems, 'test': 1319)."""
    if split not in GSM8K_SPLITS:
        raise UserError(f"GSM8K has no split {split!r}; use 'gsm8k:train' or 'gsm8k:test'")
    return GSM8K_DIR / f"{split}.jsonl"


@dataclass
class PromptRecord:
    question: str                 # the raw question text
    answer: str                   # gold final answer (string)
    source: str                   # task name or file path
    index: int                    # position in the source
    prompt: str = ""              # text given to the model (after the chat template)
    metadata: dict = field(default_factory=dict)


def gsm8k_final_answer(solution: str) -> str:
    """The text after '####' in a GSM8K solution, commas removed."""
    if "####" not in solution:
        raise ValueError("no '####' in solution")
    return solution.split("####")[-1].strip().replace(",", "")


def jsonl_rows(path):
    """(line number, parsed object) for each non-blank line of a JSONL file; a line that is
    not JSON is a UserError naming the file and line."""
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must "
                                "be one JSON object") from None


def load_jsonl(path, limit: int | None = None) -> list[PromptRecord]:
    """GSM8K-format JSONL: one object per line with 'question' and 'answer' (a solution
    ending in '#### x', or a bare answer)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {str(path)!r} does not exist: give a JSONL file with "
                        "'question' and 'answer' fields, or a reasoning-gym task name")
    records = []
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or "question" not in row:
            raise UserError(f"{path}:{lineno}: line has no 'question' field; each line "
                            "needs 'question' (and 'answer' for rewards)")
        raw = str(row.get("answer", ""))
        gold = gsm8k_final_answer(raw) if "####" in raw else raw.strip()
        records.append(PromptRecord(question=str(row["question"]), answer=gold,
                                    source=str(path), index=len(records),
                                    metadata={"solution": raw}))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def gym_task_names() -> list[str]:
    import reasoning_gym  # noqa: F401  (registers the tasks)
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def load_gym_task(name: str, size: int = 64, seed: int = 0, **task_kwargs) -> list[PromptRecord]:
    """Prompts from a reasoning-gym generator (offline). The entry is kept in metadata."""
    return list(iter_gym_task(name, size, seed, **task_kwargs))


def iter_gym_task(name: str, size: int = 64, seed: int = 0, **task_kwargs):
    """The records of `load_gym_task`, generated one at a time (item i comes from seed + i,
    so a consumer that stops early has generated only what it read)."""
    import reasoning_gym

    names = gym_task_names()
    if name not in names:
        raise UserError(f"reasoning-gym has no task {name!r}{nearest(name, names)}; "
                        f"examples: chain_sum, basic_arithmetic, countdown, gsm_symbolic")
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **task_kwargs)
    for i in range(size):
        entry = dataset[i]
        yield PromptRecord(question=entry["question"], answer=str(entry["answer"]),
                           source=name, index=i,
                           metadata={"entry": _jsonable(entry), "task": name})


def _jsonable(entry: dict) -> dict:
    return json.loads(json.dumps(entry, default=str))


def is_file_task(task: str) -> bool:
    """True for a JSONL path or a bundled GSM8K split (their problems are file lines)."""
    return task == "gsm8k" or task.startswith("gsm8k:") or task.endswith(".jsonl") or "/" in task


def load_prompts(task: str, size: int = 64, seed: int = 0, **task_kwargs) -> list[PromptRecord]:
    """A task name (reasoning-gym), 'gsm8k[:train|:test]' (bundled), or a .jsonl path."""
    return list(iter_prompts(task, size, seed, **task_kwargs))


def iter_prompts(task: str, size: int | None = 64, seed: int = 0, **task_kwargs):
    """The records of `load_prompts`; a reasoning-gym task generates them one at a time.
    size None: every line of a file task (a reasoning-gym task needs a size)."""
    if task == "gsm8k" or task.startswith("gsm8k:"):
        return iter(load_jsonl(gsm8k_path(task.partition(":")[2] or "train"), limit=size))
    if is_file_task(task):
        return iter(load_jsonl(task, limit=size))
    return iter_gym_task(task, size=size, seed=seed, **task_kwargs)


def apply_chat_template(records: list[PromptRecord], tokenizer,
                        instruction: str | None = DEFAULT_INSTRUCTION,
                        system_prompt: str | None = None) -> list[PromptRecord]:
    """Fill `record.prompt`: the question (+ instruction) through the tokenizer's chat
    template when it has one, else plain text ending in 'Answer:'."""
    for record in records:
        content = record.question if not instruction else f"{record.question}\n{instruction}"
        if getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            messages.append({"role": "user", "content": content})
            record.prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
        else:
            record.prompt = (f"{system_prompt}\n\n" if system_prompt else "") + \
                f"{content}\nAnswer:"
    return records
