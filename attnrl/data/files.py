"""Prompt files: the rows of a data file, whatever its format, read as dicts.

    .jsonl           one JSON object per line (read here: errors name the line)
    .json            an array of objects, or one object per line
    .csv             a header row, then one row per prompt (every cell read as text)
    .parquet         one row per prompt (read with `datasets`)
    DIR, DIR:SPLIT   a saved Hugging Face dataset (`Dataset.save_to_disk`); a saved
                     DatasetDict needs its split unless it holds one

`iter_rows(task)` yields (where, row, unit) per prompt: `where` names the file and the line
("qa.jsonl:3") or row ("qa.csv row 3", counted from 1 after the header), `unit` says which
('line' / 'row'); attnrl.data maps the row's fields to a question and an answer. A file
that cannot be read is a UserError naming it. A path is a file task when it ends in one of
SUFFIXES, contains a '/', or is an existing directory (`is_data_path`); paths are relative
to the working directory.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from attnrl.errors import UserError, nearest

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("a .jsonl, .json, .csv or .parquet file, or a saved Hugging Face dataset "
           "directory (DIR or DIR:SPLIT)")


def data_source(task: str) -> tuple[Path, str | None]:
    """(path, split) of a file task; 'DIR:SPLIT' names a split of a saved DatasetDict."""
    path = Path(task)
    if not path.exists() and ":" in task:
        head, _, split = task.rpartition(":")
        if head and Path(head).is_dir():
            return Path(head), split
    return path, None


def is_data_path(task: str) -> bool:
    """True for a path to data: a known suffix, a '/', or an existing directory."""
    return task.endswith(SUFFIXES) or "/" in task or data_source(task)[0].is_dir()


def source_problem(task: str) -> str | None:
    """Why `task` is no readable data source (None when it may be read)."""
    path = data_source(task)[0]
    if path.is_dir():
        return None
    if not path.is_file():
        kind = f"{path.suffix} file" if path.suffix in SUFFIXES else f"data file ({FORMATS})"
        return f"is not an existing {kind}"
    if path.suffix not in SUFFIXES:
        return (f"has the unsupported suffix {path.suffix or '(none)'!r}; give {FORMATS}")
    return None


def jsonl_rows(path):
    """(line number, parsed object) for each non-blank line of a JSONL file; a line that is
    not JSON is a UserError naming the file and line."""
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must "
                            "be one JSON object") from None


def iter_rows(task: str):
    """(where, row, unit) for every prompt of a data file or saved dataset (see the module
    docstring); UserError when it cannot be read."""
    problem = source_problem(task)
    if problem:
        raise UserError(f"{task!r} {problem}")
    path, split = data_source(task)
    if path.is_dir():
        rows = _saved_rows(path, split, task)
    elif path.suffix == ".jsonl":
        return ((f"{path}:{n}", row, "line") for n, row in jsonl_rows(path))
    elif path.suffix == ".json":
        return _json_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        rows = _parquet_rows(path)
    return ((f"{path} row {n}", row, "row") for n, row in enumerate(rows, 1))


def _text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); a {Path(path).suffix} "
                        f"file is text; give {FORMATS}") from None


def _json_rows(path: Path):
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line
            return ((f"{path}:{n}", row, "line") for n, row in jsonl_rows(path))
        raise UserError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} "
                        f"({err.msg}); a .json file holds an array of objects (or one "
                        "object per line)") from None
    if isinstance(data, dict):
        nested = [k for k, v in data.items() if isinstance(v, list) and v
                  and isinstance(v[0], dict)]
        if nested:
            raise UserError(f"{path}: the records are under the key {nested[0]!r}; write "
                            "them as a top-level JSON array (or one object per line)")
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json file holds an array of objects, not "
                        f"{type(data).__name__}")
    return ((f"{path} row {n}", row, "row") for n, row in enumerate(data, 1))


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without progress bars and log lines, its cache in a temporary directory
    (nothing is left behind)."""
    import logging
    import tempfile

    from datasets.utils import logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="attnrl-data-") as cache:
            yield cache
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        try:
            header = next(csv.reader(handle), None)
        except (csv.Error, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not a readable CSV file ({_root_cause(err)})") from None
    if not header:
        raise UserError(f"{path} holds no prompts (no header row)")
    from datasets import Dataset, Features, Value

    features = Features({name: Value("string") for name in header})
    with _quiet_datasets() as cache:
        try:  # every cell as text: '007' stays '007', 'NA' stays 'NA'
            data = Dataset.from_csv(str(path), cache_dir=cache, keep_in_memory=True,
                                    features=features, keep_default_na=False)
        except Exception as err:  # noqa: BLE001  (pandas / arrow errors: one line)
            raise UserError(f"{path}: not a readable CSV file ({_root_cause(err)})") from None
        return data.to_list()


def _parquet_rows(path: Path) -> list[dict]:
    from datasets import Dataset

    with _quiet_datasets() as cache:
        try:
            data = Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as err:  # noqa: BLE001  (arrow errors: one line)
            raise UserError(f"{path}: not a readable Parquet file ({_root_cause(err)})") \
                from None
        return data.to_list()


def _saved_rows(path: Path, split: str | None, task: str) -> list[dict]:
    import datasets

    with _quiet_datasets():
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path} is a directory but no saved Hugging Face dataset "
                            f"(datasets.load_from_disk: {_root_cause(err)}); give "
                            f"{FORMATS}") from None
        if isinstance(data, datasets.DatasetDict):
            splits = list(data)
            if split is None and len(splits) == 1:
                split = splits[0]
            if split is None:
                raise UserError(f"{path} is a saved DatasetDict with the splits "
                                f"{', '.join(splits)}; name one: {path}:{splits[0]}")
            if split not in data:
                raise UserError(f"{task}: {path} has no split {split!r}"
                                f"{nearest(split, splits)}; its splits: {', '.join(splits)}")
            data = data[split]
        elif split is not None:
            raise UserError(f"{task}: {path} is a saved Dataset without splits; give {path}")
        return data.to_list()
