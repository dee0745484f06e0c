"""A LoRA adapter directory (a LoRA run's final/ or checkpoint-N: adapter_config.json and
adapter_model.safetensors, no config.json) used wherever a model directory is expected.

`merged_adapter(path, base_dir, cache)` loads the adapter over its base model
(adapter_config.json's `base_model_name_or_path`, a local directory or 'smollm2', resolved
by the caller), merges it (W + (alpha / r) B A, PEFT's merge) and saves the result once,
with the tokenizer, under CACHE/<hash of the adapter files and the base>; later calls
reuse it. The
cache entry is written to a temporary name and renamed when complete.
`attnrl.models.resolve_model` calls it, so `eval`, `generate`, `signals`, `analyze`,
`merge` and the engines take an adapter directory as they take a model directory and say
which base they loaded it over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_dir(path) -> bool:
    """A directory with adapter_config.json and no config.json."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path) -> str:
    """The base model an adapter directory names (UserError when it names none)."""
    from attnrl.errors import UserError

    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}/{ADAPTER_CONFIG} is not readable JSON ({err})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path} is a LoRA adapter whose {ADAPTER_CONFIG} names no "
                        "base_model_name_or_path: set it to the base model's local directory")
    return str(base)


def adapter_problem(path) -> str | None:
    """Why an adapter directory cannot be used (None: it can), read without loading."""
    from attnrl.errors import UserError

    path = Path(path)
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        return (f"is a LoRA adapter directory without {ADAPTER_WEIGHTS[0]}: give a complete "
                "adapter (a LoRA run's final/ or checkpoint-N)")
    try:
        base = adapter_base(path)
    except UserError as err:
        return str(err).removeprefix(f"{path} ")
    if base.lower() in ("smollm2", "smollm2-135m-instruct") or \
            (Path(base).expanduser() / "config.json").is_file():
        return None
    return (f"is a LoRA adapter over {base!r}, which is not a local model directory here: "
            f"set base_model_name_or_path in {path / ADAPTER_CONFIG} to the base model's "
            "directory")


def merged_adapter(path, base_dir, cache: Path) -> Path:
    """The merged model of an adapter directory over `base_dir` (its base, resolved), built
    on first use under `cache` (see the module)."""
    from attnrl.errors import UserError

    path = Path(path).expanduser().resolve()
    problem = adapter_problem(path)
    if problem:
        raise UserError(f"{path} {problem}")
    base_dir = Path(base_dir)
    weights = next(path / n for n in ADAPTER_WEIGHTS if (path / n).is_file())
    digest = hashlib.sha256()
    digest.update(str(base_dir.resolve()).encode())
    for name in (ADAPTER_CONFIG, weights.name):
        digest.update((path / name).read_bytes())
    target = Path(cache) / digest.hexdigest()[:20]
    if (target / "config.json").is_file():
        print(f"LoRA adapter {path} over {base_dir} (merged: {target})", file=sys.stderr)
        return target
    print(f"LoRA adapter {path} over {base_dir}: merging into {target}", file=sys.stderr)
    import os

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnrl.attention_config import read_config

    base_config = read_config(str(base_dir)) or {}
    dtype = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir),
                                                 dtype=getattr(torch, dtype, torch.float32))
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(staging)
    (staging / "ADAPTER.txt").write_text(f"merged from LoRA adapter {path}\nbase {base_dir}\n")
    try:
        staging.rename(target)
    except OSError:  # another process finished the same merge first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
