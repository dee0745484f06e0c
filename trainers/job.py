"""A training job from a YAML config: parse, check against the schema, build
data/rewards/model/trainer, run.

A config is one flat mapping. Job keys say what to train on; every other key is a field of
the trainer's config class (AttnGRPOConfig / NSRConfig, i.e. TRL's GRPOConfig plus attnrl's
fields). Every key, its type, range and default is declared in
trainers/schema_declarations.py; this module parses YAML and command-line overrides and
checks them with trainers/schema.py, importing nothing
heavy (no torch, TRL or vLLM), so a bad value fails in well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from attnrl.errors import UserError, nearest
from trainers.schema import JOB_KEYS, check_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
COMMAND_LINE = "command line"

JOB_FIELDS = {k.name: k.doc for k in JOB_KEYS}
"""Job keys and what they mean (the declarations are in trainers/schema_declarations.py)."""


def trainer_config_class(trainer: str):
    """AttnGRPOConfig or NSRConfig (imports TRL)."""
    if trainer == "grpo":
        from trainers.grpo import AttnGRPOConfig

        return AttnGRPOConfig
    if trainer == "nsr":
        from trainers.nsr import NSRConfig

        return NSRConfig
    raise UserError(f"unknown trainer {trainer!r}{nearest(trainer, ['grpo', 'nsr'])}; "
                    "choose grpo or nsr")


class Overrides(dict):
    """Parsed command-line overrides; `bare` holds the keys given without a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bare: set[str] = set()


def parse_overrides(items: list[str]) -> Overrides:
    """['--key', 'value', '--key=value', '--flag', ...] -> {key: value read as YAML}."""
    overrides, i = Overrides(), 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise UserError(f"{COMMAND_LINE}: unexpected argument {item!r}: overrides are "
                            "--key value pairs")
        key = item[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not _is_option(items[i + 1]):
            raw, i = items[i + 1], i + 2
        else:
            raw, i = "true", i + 1
            overrides.bare.add(key.replace("-", "_"))
        key = key.replace("-", "_")
        overrides[key] = _scalar(raw, key)
    return overrides


def _is_option(text: str) -> bool:
    """'--key' starts an option; '-1' or '-1e-5' is a (negative) value."""
    if not text.startswith("-"):
        return False
    try:
        float(text)
        return False
    except ValueError:
        return text.startswith("--")


def _scalar(raw: str, key: str = "value"):
    """A command-line value read as YAML ('1e-5' -> 1e-05, '[1, 2]' -> [1, 2])."""
    try:
        return _number_or_text(yaml.safe_load(raw))
    except yaml.YAMLError as err:
        raise UserError(f"{COMMAND_LINE}: --{key} {raw!r} is not valid YAML "
                        f"({_yaml_problem(err)})") from None


def _number_or_text(value):
    """YAML 1.1 reads '1e-5' (no dot) as a string: make such strings floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return " ".join(f"{where}{problem}".split())


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's mapping, or UserError (missing file, YAML syntax, not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; give --config PATH.yaml "
                        f"(examples in {CONFIG_DIR})")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: YAML syntax error at {_yaml_problem(err)}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    return config


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                override_source: str = COMMAND_LINE) -> dict:
    """The merged flat config (file, then overrides), checked against the schema; only the
    keys given (trainers.schema.resolve fills in the defaults)."""
    path = Path(path) if path else DEFAULT_CONFIG
    config = read_yaml(path)
    overrides = overrides or {}
    if "task" in overrides and "task_kwargs" not in overrides and \
            overrides["task"] != config.get("task", "chain_sum"):
        config.pop("task_kwargs", None)  # they belong to the file's task, not to this one
    sources = {key: str(path) for key in config}
    sources.update({key: override_source for key in overrides})
    config = check_config({**config, **overrides}, sources,
                          bare=getattr(overrides, "bare", set()))
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


def validate_config(config: dict, source: str = "config") -> dict:
    """Every key known, every value allowed, the rules between keys (batch divisibility,
    layer ranges, ...): all before any model loads. Returns the checked config."""
    return check_config(config, source=source)


def build_dataset(config: dict, tokenizer, report: dict | None = None):
    """Prompts as a datasets.Dataset with TRL's 'prompt' column (conversational when the
    tokenizer has a chat template) and the reward columns. The task's first task_size
    prompts (a data file through its question_field / answer_field), less those longer than
    max_prompt_length tokens; `report` (a dict) receives what was kept and dropped.
    UserError when the cap leaves none."""
    from datasets import Dataset

    from attnrl.data import DEFAULT_INSTRUCTION, file_options, load_prompts

    task = config.get("task", "chain_sum")
    records = load_prompts(task, size=config.get("task_size", 64),
                           seed=config.get("task_seed", 0), **(config.get("task_kwargs") or {}),
                           **file_options(config, task))
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
    kept = cap_prompts(rows, tokenizer, config.get("max_prompt_length"), report)
    return Dataset.from_list(kept)


def prompt_lengths(prompts: list, tokenizer) -> list[int]:
    """Tokens of each prompt as TRL's GRPO trainer tokenizes it (a conversation through the
    chat template with the generation prompt, else the text)."""
    if prompts and isinstance(prompts[0], list):
        ids = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text=prompts)["input_ids"]
    return [len(i) for i in ids]


def cap_prompts(rows: list[dict], tokenizer, cap: int | None, report: dict | None = None):
    """The rows whose prompt has at most `cap` tokens (all of them when cap is None);
    `report` receives {'prompts', 'dropped_long', 'max_prompt_length', 'longest_tokens'}."""
    info = {"prompts": len(rows), "dropped_long": 0, "max_prompt_length": cap}
    kept = rows
    if cap is not None and rows:
        lengths = prompt_lengths([r["prompt"] for r in rows], tokenizer)
        kept = [r for r, n in zip(rows, lengths) if n <= cap]
        info.update(dropped_long=len(rows) - len(kept), longest_tokens=max(lengths))
        if not kept:
            raise UserError(f"max_prompt_length {cap}: all {len(rows)} prompts are longer "
                            f"(the shortest has {min(lengths)} tokens); raise "
                            f"max_prompt_length to at least {min(lengths)}, or shorten the "
                            "instruction / system_prompt")
    if report is not None:
        report.update(info)
    return kept


def reward_options(name: str, options: dict, config: dict) -> dict:
    """The options a built-in reward is built with: `reward_options[name]`, and for
    'overlong' the job's own max_completion_length unless the options set one (the cap the
    shaping measures against is the one the completions were generated with)."""
    mine = dict(options.get(name, {}))
    if name == "overlong" and "max_completion_length" not in mine:
        from trainers.schema import default

        mine["max_completion_length"] = config.get("max_completion_length") or \
            default("max_completion_length", config.get("trainer", "grpo"))
    return mine


def build_rewards(config: dict) -> list:
    """One reward function per configured reward, taking TRL's columns (entry_json is
    decoded back into reasoning-gym entries); a plug-in ('module:function',
    'path/to/file.py:function') through rewards/plugins.py. Returns (functions, weights)."""
    from rewards import get_reward
    from rewards.plugins import is_plugin, plugin_reward

    weights = config.get("rewards") or {"answer": 1.0}
    options = config.get("reward_options") or {}
    funcs = []
    for name in weights:
        if is_plugin(name):  # called as TRL calls a reward, entry_json decoded
            funcs.append(plugin_reward(name, options.get(name, {})))
            continue
        fn = get_reward(name, **reward_options(name, options, config))

        def reward(prompts, completions, _fn=fn, entry_json=None, **columns):
            if entry_json is not None:  # reasoning-gym entries travel as JSON text
                columns["entry"] = [json.loads(e) if e else None for e in entry_json]
            return _fn(prompts, completions, **columns)

        reward.__name__ = name
        funcs.append(reward)
    return funcs, [float(w) for w in weights.values()]
