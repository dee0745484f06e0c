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


def check_gym_task(name: str, task_kwargs: dict | None = None, key: str = "task") -> None:
    """UserError unless reasoning-gym has task `name` and `task_kwargs` are fields of its
    config class with values its own validation accepts (no data is generated)."""
    import dataclasses

    import reasoning_gym  # noqa: F401  (registers the tasks)
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise UserError(f"{key}: reasoning-gym has no task {name!r}{nearest(name, DATASETS)}; "
                        "examples: chain_sum, basic_arithmetic, countdown, gsm_symbolic")
    config_cls = DATASETS[name][1]
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    for kwarg in task_kwargs or {}:
        if kwarg not in fields:
            raise UserError(f"task_kwargs: {name} has no option {kwarg!r}"
                            f"{nearest(kwarg, fields)}; its options: {', '.join(fields)}")
    try:
        config = config_cls(**(task_kwargs or {}))
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as err:
        raise UserError(f"task_kwargs {task_kwargs}: {name} refuses them ({err})") from None


def check_file_task(task: str, key: str = "task") -> None:
    """UserError unless every line of a file task has a 'question' and a non-empty
    'answer' (a prompt without a gold answer trains with reward 0 and evaluates against
    nothing)."""
    bundled = task == "gsm8k" or task.startswith("gsm8k:")
    path = gsm8k_path(task.partition(":")[2] or "train") if bundled else Path(task)
    if not path.is_file():
        raise UserError(f"{key} {task!r} is not an existing .jsonl file")
    count = 0
    for lineno, row in jsonl_rows(path):
        count += 1
        if not isinstance(row, dict) or "question" not in row:
            raise UserError(f"{key}: {path}:{lineno} has no 'question' field; each line needs "
                            "'question' and 'answer'")
        if not str(row.get("answer", "")).strip():
            raise UserError(f"{key}: {path}:{lineno} has no 'answer' (the gold answer the "
                            "reward and the evaluation compare with); add it to every line")
    if not count:
        raise UserError(f"{key}: {path} holds no prompts")


def check_task(task: str, task_kwargs: dict | None = None, key: str = "task") -> None:
    """The checks of check_file_task / check_gym_task, by the kind of task."""
    if is_file_task(task):
        if task_kwargs:
            raise UserError(f"task_kwargs {task_kwargs} given for the file task {task!r}, "
                            "which takes none; remove task_kwargs")
        check_file_task(task, key)
    else:
        check_gym_task(task, task_kwargs, key)


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
