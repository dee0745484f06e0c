"""Prompt datasets: reasoning-gym tasks and data files (attnrl/data/files.py: JSONL, JSON,
CSV, Parquet, saved datasets), turned into prompt records.

A `PromptRecord` carries the text fed to the model (chat template applied when the
tokenizer has one), the gold answer, and whatever a reward function needs (`metadata`:
for reasoning-gym, the task entry so that its own scorer can be used).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from attnrl.data.files import (  # noqa: F401  (jsonl_rows: re-exported)
    FORMATS,
    data_source,
    is_data_path,
    iter_rows,
    jsonl_rows,
    source_problem,
)
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


FIELDS = {"question_field": "question", "answer_field": "answer"}
"""The options of a file task (load_prompts' keyword arguments): which field of a row holds
the question and which the answer; the defaults are these."""


def _fields(options: dict, task: str) -> tuple[str, str]:
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise UserError(f"the file task {task!r} takes only {', '.join(FIELDS)}, not "
                        f"{', '.join(unknown)} (task_kwargs are for reasoning-gym tasks)")
    return tuple(str(options.get(k) or v) for k, v in FIELDS.items())


def _missing(where: str, key: str, row) -> str:
    """The hint, when a row lacks a field, to the fields it has and the mapping key."""
    if not isinstance(row, dict):
        return f"{where} is not an object ({type(row).__name__})"
    others = ", ".join(map(str, row)) or "none"
    return f"its fields: {others}; name the one to use with {key}"


def _value(row: dict, field: str):
    """The text of a row's field, None when absent or empty (CSV: '', Parquet: null)."""
    value = row.get(field) if isinstance(row, dict) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def load_file(task, limit: int | None = None, question_field: str = "question",
              answer_field: str = "answer") -> list[PromptRecord]:
    """Prompts of a data file (attnrl.data.files: JSONL, JSON, CSV, Parquet, a saved
    dataset): each row's `question_field` is the question, its `answer_field` the answer (a
    solution ending in '#### x', or a bare answer; may be absent)."""
    task = str(task)
    path, _ = data_source(task)
    if not path.exists():
        raise UserError(f"prompt file {task!r} does not exist: give {FORMATS} with "
                        f"'{question_field}' and '{answer_field}' fields, or a reasoning-gym "
                        "task name")
    records = []
    for where, row, unit in iter_rows(task):
        question = _value(row, question_field)
        if question is None:
            start = f"{where}: line" if unit == "line" else where
            raise UserError(f"{start} has no {question_field!r} field; each {unit} needs "
                            f"{question_field!r} (and {answer_field!r} for rewards) "
                            f"({_missing(where, 'question_field', row)})")
        raw = _value(row, answer_field) or ""
        gold = gsm8k_final_answer(raw) if "####" in raw else raw.strip()
        records.append(PromptRecord(question=question, answer=gold, source=task,
                                    index=len(records), metadata={"solution": raw}))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{task} holds no prompts")
    return records


def load_jsonl(path, limit: int | None = None, **fields) -> list[PromptRecord]:
    """GSM8K-format JSONL: one object per line with 'question' and 'answer' (a solution
    ending in '#### x', or a bare answer). Any data file: load_file."""
    return load_file(path, limit, **fields)


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


def check_file_task(task: str, key: str = "task", question_field: str = "question",
                    answer_field: str = "answer") -> int:
    """The number of prompts of a file task; UserError unless every row has a question
    (`question_field`) and a non-empty answer (`answer_field`): a prompt without a gold
    answer trains with reward 0 and evaluates against nothing."""
    bundled = task == "gsm8k" or task.startswith("gsm8k:")
    source = str(gsm8k_path(task.partition(":")[2] or "train")) if bundled else task
    problem = None if bundled else source_problem(task)
    if problem:
        raise UserError(f"{key} {task!r} {problem}")
    count = 0
    for where, row, unit in iter_rows(source):
        count += 1
        if _value(row, question_field) is None:
            raise UserError(f"{key}: {where} has no {question_field!r} field; each {unit} "
                            f"needs {question_field!r} and {answer_field!r} "
                            f"({_missing(where, 'question_field', row)})")
        if _value(row, answer_field) is None:
            hint = "" if answer_field in row else \
                f" ({_missing(where, 'answer_field', row)})"
            raise UserError(f"{key}: {where} has no {answer_field!r} (the gold answer the "
                            f"reward and the evaluation compare with); add it to every "
                            f"{unit}{hint}")
    if not count:
        raise UserError(f"{key}: {source} holds no prompts")
    return count


def check_task(task: str, task_kwargs: dict | None = None, key: str = "task",
               fields: dict | None = None) -> int | None:
    """The checks of check_file_task / check_gym_task, by the kind of task; `fields`: a file
    task's field mapping (FIELDS). Returns a file task's number of prompts (None: a
    reasoning-gym task, which generates any number)."""
    if is_file_task(task):
        if task_kwargs:
            raise UserError(f"task_kwargs {task_kwargs} given for the file task {task!r}, "
                            "which takes none; remove task_kwargs")
        question, answer = _fields(fields or {}, task)
        return check_file_task(task, key, question, answer)
    check_gym_task(task, task_kwargs, key)
    return None


def file_options(config: dict, task: str) -> dict:
    """The field mapping of `task` in a flat job config (question_field, answer_field where
    they are not the defaults): for the user's data files, not for the bundled gsm8k or a
    reasoning-gym task."""
    if not is_file_task(task) or task == "gsm8k" or task.startswith("gsm8k:"):
        return {}
    return {k: str(config[k]) for k, v in FIELDS.items() if config.get(k) not in (None, v)}


def _jsonable(entry: dict) -> dict:
    return json.loads(json.dumps(entry, default=str))


def is_file_task(task: str) -> bool:
    """True for a data file or saved dataset (attnrl.data.files.is_data_path) or a bundled
    GSM8K split: their problems are rows, read in order."""
    return task == "gsm8k" or task.startswith("gsm8k:") or is_data_path(task)


def load_prompts(task: str, size: int = 64, seed: int = 0, **task_kwargs) -> list[PromptRecord]:
    """A task name (reasoning-gym), 'gsm8k[:train|:test]' (bundled), or a data file
    (`task_kwargs`: for a file, its field mapping, FIELDS)."""
    return list(iter_prompts(task, size, seed, **task_kwargs))


def iter_prompts(task: str, size: int | None = 64, seed: int = 0, **task_kwargs):
    """The records of `load_prompts`; a reasoning-gym task generates them one at a time.
    size None: every row of a file task (a reasoning-gym task needs a size)."""
    if task == "gsm8k" or task.startswith("gsm8k:"):
        question, answer = _fields(task_kwargs, task)
        return iter(load_file(gsm8k_path(task.partition(":")[2] or "train"), size, question,
                              answer))
    if is_file_task(task):
        return iter(load_file(task, size, *_fields(task_kwargs, task)))
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
