"""Checks of command-line arguments that need no model and no torch, so a mistake is one
line within a second (`attnrl signals`, `analyze`, `generate`, `eval`): the model exists,
--layers fit it, --device exists on this machine, --task names a task."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from attnrl.attention_config import read_config
from attnrl.errors import UserError

DEFAULT_MODEL = "smollm2"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
SMOLLM2_LAYERS = 30  # num_hidden_layers of the packaged SmolLM2-135M-Instruct
SMOLLM2_CONTEXT = 8192  # its max_position_embeddings


def context_length(model) -> int | None:
    """max_position_embeddings of a model, read without loading it (None: not readable)."""
    if is_packaged(model):
        return SMOLLM2_CONTEXT
    config = read_config(model)
    value = None if config is None else config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def is_packaged(model) -> bool:
    return str(model) in SMOLLM2_NAMES or str(model).lower() in SMOLLM2_NAMES


def no_gpu_here() -> bool:
    """True when this machine certainly has no visible GPU: no NVIDIA or ROCm device files,
    or CUDA_VISIBLE_DEVICES hides them all (checked without importing torch)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return True
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def model_problem(model) -> str | None:
    """What is wrong with a model argument ('not found: ...'), None when it can load."""
    if is_packaged(model):
        return None
    path = Path(str(model)).expanduser()
    if not path.exists():
        return ("not found: give a local Hugging Face model directory or 'smollm2' for the "
                "packaged SmolLM2-135M-Instruct")
    if not (path / "config.json").is_file():
        from attnrl.lora_adapter import adapter_problem, is_adapter_dir

        if is_adapter_dir(path):
            return adapter_problem(path)
        return ("has no config.json: give a directory saved with save_pretrained, or a LoRA "
                "adapter directory (adapter_config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        return ("has config.json but no weights (*.safetensors or pytorch_model*.bin): give the "
                "directory the model was saved to with save_pretrained")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return ("has no tokenizer (none of " + ", ".join(TOKENIZER_FILES) + "): save the "
                "tokenizer beside the weights (tokenizer.save_pretrained(DIR))")
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in a model directory: a tokenizer transformers can load from it."""


def check_model(model, flag: str = "--model") -> None:
    problem = model_problem(model)
    if problem:
        raise UserError(f"{flag} {str(model)!r} {problem}")


def layer_count(model) -> int | None:
    """num_hidden_layers of a model, read without loading it (None: not readable)."""
    if is_packaged(model):
        return SMOLLM2_LAYERS
    config = read_config(model)
    return None if config is None else config.get("num_hidden_layers")


def layers_problem(layers: list[int] | None, model) -> str | None:
    """'[99] out of range: the model has 30 layers (...)' for layer indices outside the
    model (negative ones count from the end); None when they fit or the model's layer
    count cannot be read without loading it."""
    count = layer_count(model) if layers else None
    if count is None:
        return None
    bad = [i for i in layers if not -count <= i < count]
    if not bad:
        return None
    return (f"{bad} out of range: the model has {count} layers (valid 0..{count - 1}, or "
            "negative from the end)")


def check_layers(layers: list[int] | None, model, flag: str = "--layers") -> None:
    problem = layers_problem(layers, model)
    if problem:
        raise UserError(f"{flag} {problem}")


def check_device(device: str, flag: str = "--device") -> None:
    text = str(device).lower()
    if text.startswith("cuda") and no_gpu_here():
        raise UserError(f"{flag} {device!r}: this machine has no CUDA device; use --device "
                        "cpu")
    if not (text == "cpu" or text.startswith(("cuda", "mps", "xpu"))):
        raise UserError(f"{flag} {device!r} is not a torch device; use cpu or cuda[:N]")


def check_task(task: str, flag: str = "--task", need_answers: bool = False,
               task_kwargs: dict | None = None, fields: dict | None = None) -> None:
    """A reasoning-gym task name (checked against its registry, with its task_kwargs against
    its config class) or an existing data file (attnrl/data/files.py; with a question and an
    answer in every row when `need_answers`; `fields`: its question_field / answer_field)."""
    from attnrl.data import check_file_task, check_gym_task, is_file_task

    if task_kwargs and is_file_task(task):
        raise UserError(f"--task_kwargs {task_kwargs} given for the file task {task!r}, which "
                        "takes none; remove --task_kwargs")
    if not is_file_task(task):
        check_gym_task(task, task_kwargs, flag)
    elif need_answers:
        check_file_task(task, flag, **(fields or {}))
    elif task == "gsm8k" or task.startswith("gsm8k:"):
        from attnrl.data import gsm8k_path

        gsm8k_path(task.partition(":")[2] or "train")
    else:
        from attnrl.data.files import source_problem

        problem = source_problem(task)
        if problem:
            raise UserError(f"{flag} {task!r} {problem}")


def parse_layers(text: str | None, flag: str = "--layers") -> list[int] | None:
    """'10,12,14' -> [10, 12, 14]; None or '' -> None."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} "
                        "10,12,14") from None
