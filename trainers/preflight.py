"""Every check of a job that needs no model, made before anything is written or loaded
(imports nothing heavy but reasoning-gym's registry, `datasets` for a data file that is
not JSONL, and the plug-in rewards): the model and data exist, the task and its
task_kwargs (against the task's own config class), a file task's fields and size, the
held-out task, the rewards and their options, the reasoning-vector target, and the output
path."""

from __future__ import annotations

import os
from pathlib import Path

from attnrl.attention_config import read_config
from attnrl.cli_checks import is_packaged, model_problem
from attnrl.data import check_task, file_options
from attnrl.errors import UserError
from trainers.heldout_keys import heldout_settings, vector_settings
from trainers.schema import check_paths


def check_job(resolved: dict) -> None:
    """UserError (one line naming the key) for the first problem found in a resolved
    job config; returns None when the job can start."""
    check_paths(resolved)
    check_rewards(resolved)
    task = str(resolved["task"])
    count = check_task(task, resolved.get("task_kwargs"), "task",
                       fields=file_options(resolved, task))
    if count is not None and resolved["task_size"] > count:
        raise UserError(f"task_size {resolved['task_size']}: {task} holds {count} prompts; set "
                        f"task_size to at most {count} (the run would train on {count} and "
                        "record more)")
    heldout = heldout_settings(resolved)
    if heldout.enabled and heldout.task != resolved["task"]:
        check_task(heldout.task, heldout.task_kwargs, "eval_task", fields=heldout.fields)
    check_output_dir(resolved["output_dir"], "output_dir")
    vector = vector_settings(resolved)
    if vector is not None:
        check_vector(vector, resolved["model"])


def check_rewards(resolved: dict) -> None:
    """Every reward with its options: a registered one takes them (named parameters), a
    plug-in imports, is a function and takes a reward's call and its options
    (rewards/plugins.py). Imports the plug-ins (the user's code), nothing else heavy."""
    from rewards import get_reward

    options = resolved.get("reward_options") or {}
    for name in resolved["rewards"]:
        get_reward(name, **options.get(name, {}))


def reward_plugins(resolved: dict) -> dict | None:
    """{plug-in: {file, sha256}} of the job's plug-in rewards (None: it has none): recorded as
    the key reward_plugins, so a resumed run whose plug-in changed is refused."""
    from rewards.plugins import fingerprint, is_plugin

    found = {name: fingerprint(name) for name in resolved["rewards"] if is_plugin(name)}
    return found or None


def check_output_dir(path, key: str) -> None:
    """The directory can be created (or is one) and written to."""
    path = Path(str(path)).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} {str(path)!r} is a file, not a directory; give another "
                        f"--{key}")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{key} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key} {str(path)!r} is not writable ({str(parent)!r} is not "
                        "writable by this user); give another --" + key)
    import tempfile

    try:  # permissions are not everything (/proc, read-only mounts): try it, leave nothing
        os.rmdir(tempfile.mkdtemp(prefix=".attnrl-probe-", dir=parent))
    except OSError as err:
        raise UserError(f"{key} {str(path)!r} cannot be created in {str(parent)!r} "
                        f"({err.strerror or err}); give another --{key}") from None


def _model_shape(model) -> dict | None:
    """The fields of a local model's config.json that decide whether two models' tensors
    pair up (None for the packaged model, whose shape is known only after conversion)."""
    config = None if is_packaged(model) else read_config(model)
    if config is None:
        return None
    return {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                       "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads")}


def check_vector(vector, model) -> None:
    """reasoning_vector: target (and sft) exist and have the trained model's shape; out is a
    directory path."""
    for name in ("target", "sft"):
        value = getattr(vector, name)
        if value is None:
            continue
        problem = model_problem(value)
        if problem:
            raise UserError(f"reasoning_vector.{name} {value!r} {problem}")
        shape, start = _model_shape(value), _model_shape(model)
        if shape and start and shape != start:
            diff = ", ".join(f"{k} {start[k]} vs {shape[k]}" for k in shape
                             if shape[k] != start[k])
            raise UserError(f"reasoning_vector.{name} {value!r} does not have the trained "
                            f"model's shape ({diff}); give a model of the same architecture")
    if vector.out is not None:
        check_output_dir(vector.out, "reasoning_vector.out")
