"""A training job from a YAML config: validate, build data/rewards/model/trainer, run.

A config is one flat mapping. Job keys (JOB_FIELDS) say what to train on; every other key
is a field of the trainer's config class (AttnGRPOConfig / NSRConfig, i.e. TRL's
GRPOConfig plus attnrl's fields). Unknown keys, strategies, estimators and layer indices
are errors raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from attnrl.errors import UserError, nearest
from trainers.heldout import HELDOUT_FIELDS
from trainers.heldout import validate as validate_heldout

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

JOB_FIELDS = {
    "model": "local HF model directory or 'smollm2' (the packaged SmolLM2-135M-Instruct)",
    "task": "reasoning-gym task name or a GSM8K-style .jsonl file",
    "task_size": "number of training prompts",
    "task_seed": "seed of the task generator",
    "task_kwargs": "extra arguments of the reasoning-gym task (e.g. min_terms)",
    "instruction": "text appended to each question ('' = none; absent: the default '####' one)",
    "system_prompt": "optional system message",
    "rewards": "{reward name: weight}, names from rewards.REWARDS",
    "reward_options": "{reward name: {option: value}}",
    "trainer": "grpo | nsr",
    "lora": "null, or {r, lora_alpha, lora_dropout, target_modules} for PEFT LoRA",
    "dtype": "float32 | bfloat16 (policy weights)",
    "resume": "auto (resume from the last checkpoint in output_dir if any) | never | a path",
    "wandb_project": "W&B project name (offline unless WANDB_MODE says otherwise)",
}
# Held-out evaluation and reasoning-vector keys: defined, documented and parsed in
# trainers/heldout.py (HELDOUT_FIELDS, heldout_settings, vector_settings).
JOB_FIELDS.update(HELDOUT_FIELDS)


def trainer_config_class(trainer: str):
    if trainer == "grpo":
        from trainers.grpo import AttnGRPOConfig

        return AttnGRPOConfig
    if trainer == "nsr":
        from trainers.nsr import NSRConfig

        return NSRConfig
    raise UserError(f"unknown trainer {trainer!r}{nearest(trainer, ['grpo', 'nsr'])}; "
                    "choose grpo or nsr")


def parse_overrides(items: list[str]) -> dict:
    """['--key', 'value', '--flag', ...] -> {key: parsed value} (YAML scalars)."""
    overrides, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise UserError(f"unexpected argument {item!r}: overrides are --key value pairs")
        key = item[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            raw, i = items[i + 1], i + 2
        else:
            raw, i = "true", i + 1
        overrides[key] = _scalar(raw)
    return overrides


def _scalar(raw: str):
    """A command-line value read as YAML ('1e-5' -> 1e-05, '[1, 2]' -> [1, 2])."""
    return _number_or_text(yaml.safe_load(raw))


def _number_or_text(value):
    """YAML 1.1 reads '1e-5' (no dot) as a string: make such strings floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> dict:
    """The merged flat config (file, then overrides), validated."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; give --config PATH.yaml "
                        f"(examples in {CONFIG_DIR})")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    config = {k: _number_or_text(v) for k, v in config.items()}
    config.update(overrides or {})
    validate_config(config, source=str(path))
    if config.get("deepspeed"):
        config["deepspeed"] = resolve_deepspeed(config["deepspeed"])
    return config


def resolve_deepspeed(value):
    """A DeepSpeed config: a dict, a JSON file (relative to the working directory or to the
    repository), or the name of one in configs/deepspeed ('zero2', 'zero3',
    'zero3_offload'). Returns the dict or the file's path."""
    if isinstance(value, dict):
        return value
    for path in (Path(str(value)), CONFIG_DIR.parent / str(value),
                 CONFIG_DIR / "deepspeed" / f"{value}.json"):
        if path.is_file():
            return str(path)
    choices = sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))
    raise UserError(f"deepspeed config {str(value)!r} not found{nearest(value, choices)}; give "
                    f"a JSON file or one of {', '.join(choices)} (in {CONFIG_DIR / 'deepspeed'})")


def validate_config(config: dict, source: str = "config") -> None:
    """Unknown keys (with the nearest valid one), unknown strategy / estimator / reward,
    signal layers out of range: all before any model loads."""
    cls = trainer_config_class(config.get("trainer", "grpo"))
    fields = {f.name for f in dataclasses.fields(cls)}
    valid = fields | set(JOB_FIELDS)
    for key in config:
        if key not in valid:
            raise UserError(f"{source}: unknown config key {key!r}{nearest(key, valid)}; job "
                            f"keys: {', '.join(JOB_FIELDS)}; the rest are {cls.__name__} fields")
    from attnrl.advantages import ESTIMATORS
    from attnrl.credit import strategy_parts

    strategy_parts(config.get("credit", "uniform"))  # raises listing the registered ones
    estimator = config.get("advantage_estimator", "grpo")
    if estimator not in ESTIMATORS:
        raise UserError(f"{source}: unknown advantage_estimator {estimator!r}"
                        f"{nearest(estimator, ESTIMATORS)}; registered: {', '.join(ESTIMATORS)}")
    from rewards import REWARDS

    for name in (config.get("rewards") or {"answer": 1.0}):
        if name not in REWARDS:
            raise UserError(f"{source}: unknown reward {name!r}{nearest(name, REWARDS)}; "
                            f"registered: {', '.join(REWARDS)}")
    try:
        validate_heldout(config)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    for key in ("signal_layers", "qk_layers"):
        layers = config.get(key)
        if layers is None:
            continue
        from attnrl.models import resolve_model

        model_config = json.loads((resolve_model(config.get("model", "smollm2"))
                                   / "config.json").read_text())
        count = model_config.get("num_hidden_layers")
        bad = [i for i in layers if not isinstance(i, int) or not -count <= i < count]
        if bad:
            raise UserError(f"{source}: {key} {bad} out of range: the model has {count} "
                            f"layers (valid 0..{count - 1})")


def build_dataset(config: dict, tokenizer):
    """Prompts as a datasets.Dataset with TRL's 'prompt' column (conversational when the
    tokenizer has a chat template) and the reward columns."""
    from datasets import Dataset

    from attnrl.data import DEFAULT_INSTRUCTION, load_prompts

    records = load_prompts(config.get("task", "chain_sum"), size=config.get("task_size", 64),
                           seed=config.get("task_seed", 0), **(config.get("task_kwargs") or {}))
    instruction = config.get("instruction")
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    system = config.get("system_prompt")
    rows = []
    for r in records:
        content = f"{r.question}\n{instruction}" if instruction else r.question
        if getattr(tokenizer, "chat_template", None):
            prompt = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": content}]
        else:
            prompt = f"{system}\n\n{content}\nAnswer:" if system else f"{content}\nAnswer:"
        entry = r.metadata.get("entry")
        rows.append({"prompt": prompt, "answer": r.answer, "task": r.source,
                     "entry_json": json.dumps(entry) if entry is not None else ""})
    return Dataset.from_list(rows)


def build_rewards(config: dict) -> list:
    """One reward function per configured reward, taking TRL's columns (entry_json is
    decoded back into reasoning-gym entries). Returns (functions, weights)."""
    from rewards import get_reward

    weights = config.get("rewards") or {"answer": 1.0}
    options = config.get("reward_options") or {}
    funcs = []
    for name in weights:
        fn = get_reward(name, **options.get(name, {}))

        def reward(prompts, completions, _fn=fn, entry_json=None, **columns):
            if entry_json is not None:  # reasoning-gym entries travel as JSON text
                columns["entry"] = [json.loads(e) if e else None for e in entry_json]
            return _fn(prompts, completions, **columns)

        reward.__name__ = name
        funcs.append(reward)
    return funcs, [float(w) for w in weights.values()]
