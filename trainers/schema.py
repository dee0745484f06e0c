"""The schema of a training config: every key with its type, range or choices, default and
meaning, checked before anything heavy (torch, vLLM, TRL) is imported.

A config is one flat mapping of
- job keys (JOB_KEYS): what to train on, read by trainers/job.py and trainers/cli.py;
- attnrl's trainer fields (ATTNRL_KEYS): the fields AttnGRPOConfig adds to TRL's GRPOConfig;
- TRL's fields: the ones declared in TRL_KEYS with ranges, and every other GRPOConfig field
  with the type and default recorded in trainers/trl_fields.py (generated from TRL).

Adding a key is one declaration, `Key(name, kinds, default, doc, ...)`, in the list it
belongs to; a job key is then read with `config[name]` (the resolved config holds every
key), a trainer field must also be declared on AttnGRPOConfig with the same default
(tests/trainers/test_schema.py checks both directions). Arguments of Key:
    kinds    'int' | 'float' | 'bool' | 'str' | 'list' | 'dict' | 'int_list' | 'null' |
             'any', several joined by '|' ('int|null'); an integral float is read as an int
    choices  allowed strings (a misspelling gets "did you mean")
    ge/gt/le/lt  numeric range (bounds included / excluded)
    check    fn(value) -> problem text or None, for what the above cannot say
    allowed  text describing the allowed values, when `check` decides
    resume   what a change means when a run resumes (trainers/run_dir.py): 'fixed' (a
             different run: refused), 'allowed' (refused unless named in
             --allow_config_change), 'free' (bookkeeping: always accepted)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnrl.cli_checks import SMOLLM2_NAMES, layer_count, layers_problem, model_problem
from attnrl.credit_names import (  # noqa: F401  (re-exported: the schema's registries)
    ATTENTION_CREDIT,
    CREDIT_STRATEGIES,
    SIGNED_CREDIT,
    credit_problem,
)
from attnrl.errors import UserError, nearest
from trainers.trl_fields import TRL_FIELDS

# Registries of the heavy modules, by name (tests/trainers/test_schema.py keeps them equal
# to attnrl.advantages.ESTIMATORS and rewards.REWARDS; the credit names: attnrl.credit_names).
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "psr", "nsr", "w_reinforce")
REWARDS = ("math", "gym", "answer", "format", "overlong")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
REPORT_TO = ("none", "all", "wandb", "tensorboard", "mlflow", "comet_ml", "neptune",
             "clearml", "dagshub", "dvclive", "codecarbon", "azure_ml", "flyte", "trackio",
             "swanlab")
LORA_KEYS = {  # LoraConfig fields a config may set: kinds, range / choices
    "r": ("int", {"ge": 1}), "lora_alpha": ("float", {"gt": 0}),
    "lora_dropout": ("float", {"ge": 0, "lt": 1}), "target_modules": ("str|list|null", {}),
    "bias": ("str", {"choices": ("none", "all", "lora_only")}), "use_rslora": ("bool", {}),
    "use_dora": ("bool", {}), "modules_to_save": ("list|null", {}), "task_type": ("str", {}),
    "layers_to_transform": ("int|int_list|null", {}), "init_lora_weights": ("bool|str", {}),
    "fan_in_fan_out": ("bool", {}), "lora_bias": ("bool", {}), "rank_pattern": ("dict", {}), "alpha_pattern": ("dict", {}),
    "exclude_modules": ("str|list|null", {}),
}

_LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                 "modules": "target_modules", "target": "target_modules"}


@dataclass(frozen=True)
class Key:
    name: str
    kinds: str
    default: Any
    doc: str
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    allowed: str = ""
    resume: str = "fixed"

    def describe(self) -> str:
        """What the key takes, e.g. 'a number > 0' or 'one of vllm, vllm_server, hf'."""
        if self.allowed:
            return self.allowed
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
            others = [k for k in self.kinds.split("|") if k not in ("str",)]
            return text + "".join(f" or {_KIND_TEXT[k]}" for k in others)
        parts = [_KIND_TEXT[k] for k in self.kinds.split("|")]
        text = " or ".join(p for p in parts if p != "null")
        for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if bound is not None:
                text += f" {op} {bound:g}"
        return text + (" or null" if "null" in self.kinds.split("|") else "")


_KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false",
              "str": "a string", "list": "a list", "dict": "a mapping", "null": "null",
              "int_list": "a list of integers", "any": "any value"}


# ------------------------------------------------------------------ checks of single keys
def _engine_default(expected):
    """A sampling option attnrl's engines do not apply: only its neutral value is accepted
    (anything else would be silently ignored, and the log-probs would not match)."""
    def check(value) -> str | None:
        if value != expected:
            return ("would be ignored: attnrl's rollout engines sample with temperature and "
                    "top_p only")
        return None
    return check


def _check_reasoning_vector(value) -> str | None:
    from trainers.heldout_keys import vector_settings

    try:
        vector_settings({"reasoning_vector": value})
    except UserError as err:
        return str(err)
    return None


def _check_rewards(value) -> str | None:
    if not value:
        return "needs at least one reward"
    for name, weight in value.items():
        if name not in REWARDS:
            return (f"unknown reward {name!r}{nearest(name, REWARDS)}; registered: "
                    f"{', '.join(REWARDS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not math.isfinite(weight):
            return f"the weight of reward {name!r} is {weight!r}, not a finite number"
    return None


def _check_reward_options(value) -> str | None:
    for name, options in value.items():
        if name not in REWARDS:
            return (f"unknown reward {name!r}{nearest(name, REWARDS)}; registered: "
                    f"{', '.join(REWARDS)}")
        if not isinstance(options, dict):
            return f"the options of reward {name!r} must be a mapping, got {options!r}"
    return None


def _check_lora(value) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        return "is not a mapping"
    for name, item in value.items():
        if name not in LORA_KEYS:
            hint = f" (did you mean {_LORA_ALIASES[name]!r}?)" if name in _LORA_ALIASES \
                else nearest(name, LORA_KEYS)
            return (f"unknown lora key {name!r}{hint}; lora keys: "
                    f"{', '.join(LORA_KEYS)}")
        kinds, extra = LORA_KEYS[name]
        sub = Key(f"lora.{name}", kinds, None, "", **extra)
        try:
            coerce(sub, item)
        except _Bad as bad:
            return f"lora.{name} = {item!r} {bad.problem}; lora.{name} takes {sub.describe()}"
    return None


def _check_resume(value) -> str | None:
    if isinstance(value, bool) or value in ("auto", "never"):  # true: auto, false: never
        return None
    path = Path(str(value))
    if not path.is_dir():
        return f"is not an existing directory{nearest(value, ('auto', 'never'))}"
    return None


def check_paths(config: dict) -> None:
    """UserError unless the model ('smollm2' or a saved model directory) and a file task
    exist. A job checks this when it starts, not when a config loads: shipped configs name
    models and data that exist only on training nodes."""
    for name, check in (("model", model_problem), ("task", _check_task)):
        problem = check(config[name])
        if problem:
            raise UserError(f"{name} {str(config[name])!r} {problem}")


def _check_task(value) -> str | None:
    text = str(value)
    if text == "gsm8k" or text.startswith("gsm8k:"):
        split = text.partition(":")[2] or "train"
        return None if split in ("train", "test") else \
            f"has no split {split!r}{nearest(split, ('train', 'test'))}; use gsm8k:train or gsm8k:test"
    if text.endswith(".jsonl") or "/" in text:
        return None if Path(text).is_file() else "is not an existing .jsonl file"
    return None  # a reasoning-gym name: checked with "did you mean" when the data loads


def _check_reward_aggregation(value) -> str | None:
    if value == "sum_then_normalize":
        return None
    return (f"multi_objective_aggregation {value!r} is not supported: attnrl's advantage "
            "estimators take the weighted sum of the rewards ('sum_then_normalize'); remove "
            "the key or set it to 'sum_then_normalize'")


def _check_max_steps(value) -> str | None:
    return None if value == -1 or value >= 1 else "is out of range"


def _check_report_to(value) -> str | None:
    names = [value] if isinstance(value, str) or value is None else list(value)
    for name in names:
        if name is not None and name not in REPORT_TO:
            return f"names unknown reporter {name!r}{nearest(name, REPORT_TO)}"
    return None


# ------------------------------------------------------------------ declarations
JOB_KEYS = [
    Key("model", "str", "smollm2", "local HF model directory or 'smollm2' (the packaged "
        "SmolLM2-135M-Instruct); checked to exist when the job starts (check_paths)"),
    Key("task", "str", "chain_sum", "reasoning-gym task name, 'gsm8k:train' / 'gsm8k:test', or "
        "a GSM8K-style .jsonl file (checked to exist when the job starts)"),
    Key("task_size", "int", 64, "number of training prompts", ge=1),
    Key("task_seed", "int", 0, "seed of the task generator", ge=0),
    Key("task_kwargs", "dict|null", None, "extra arguments of the reasoning-gym task (e.g. "
        "min_terms), checked against the task's config class before anything loads; a --task "
        "override on the command line drops the config file's task_kwargs"),
    Key("instruction", "str|null", None, "text appended to each question ('' = none; null: the "
        "default '####' one)"),
    Key("system_prompt", "str|null", None, "optional system message"),
    Key("rewards", "dict", {"answer": 1.0}, "{reward name: weight}, names from rewards.REWARDS",
        check=_check_rewards, allowed="a mapping {reward name: weight}"),
    Key("reward_options", "dict|null", None, "{reward name: {option: value}}",
        check=_check_reward_options, allowed="a mapping {reward name: {option: value}}"),
    Key("trainer", "str", "grpo", "grpo | nsr", choices=("grpo", "nsr")),
    Key("lora", "dict|null|bool", None, "null, or {r, lora_alpha, lora_dropout, target_modules, "
        "...} for PEFT LoRA (target_modules default 'all-linear')", check=_check_lora,
        allowed="null or a mapping of LoRA settings (r >= 1, lora_alpha > 0, ...)"),
    Key("dtype", "str", "float32", "policy weights: float32 | bfloat16",
        choices=("float32", "bfloat16")),
    Key("resume", "str|bool", "auto", "auto (continue the run in output_dir if it is the same "
        "run) | never (output_dir must be empty; --overwrite clears it) | a checkpoint path",
        check=_check_resume, allowed="auto, never or an existing checkpoint directory",
        resume="free"),
    Key("wandb_project", "str|null", None, "W&B project name (offline unless WANDB_MODE says "
        "otherwise)", resume="free"),
    Key("recorded", "dict|null", None, "written by `attnrl train` into OUTPUT_DIR/config.yaml: "
        "package versions and the command; ignored when read", resume="free"),
    # held-out evaluation and the reasoning vector [D] (rules between keys: heldout_keys.py)
    Key("eval_size", "int", 0, "held-out problems evaluated before / after training (0 = no "
        "held-out evaluation; configs/default.yaml sets 107)", ge=0),
    Key("eval_task", "str|null", None, "task of the held-out problems (null: the training task; "
        "gsm8k / gsm8k:train -> gsm8k:test; another JSONL task needs one); its problems are "
        "never in the training pool nor equivalent to a problem there (compared by question "
        "text and canonical form; too few unseen ones: refused before the model loads)"),
    Key("eval_seed", "int|null", None, "task seed of the held-out problems (null: task_seed + "
        "10000); whatever the seed, held-out problems whose question or canonical form is in "
        "the training pool are dropped (attnrl/data/unseen.py, attnrl/data/equivalence.py)"),
    Key("eval_samples", "int", 4, "samples per held-out problem at eval_temperature (pass@k)",
        ge=1),
    Key("eval_temperature", "float", 0.6, "temperature of those samples (top-p 0.95)", gt=0),
    Key("eval_max_tokens", "int|null", None, "completion cap of the evaluation in tokens (null: "
        "max_completion_length)", ge=1),
    Key("eval_before", "bool", True, "evaluate the starting model before training"),
    Key("eval_after", "bool", True, "evaluate the trained model after training"),
    Key("eval_every", "int", 0, "greedy held-out accuracy every N optimizer steps: the learning "
        "curve (0 = off)", ge=0),
    Key("reasoning_vector", "dict|null", None, "null, or {target: DIR, alpha: 1.0, sft: DIR "
        "(default: the starting model), out: DIR (default OUTPUT_DIR/reasoning_vector)}: after "
        "training rank 0 writes target + alpha (trained - sft) and evaluates it beside the "
        "trained model", check=_check_reasoning_vector,
        allowed="null or {target: DIR, alpha: number, sft: DIR, out: DIR}", resume="allowed"),
]

ATTNRL_KEYS = [
    # ---- credit (docs/methods.md section 1.5)
    Key("credit", "str", "uniform", "credit strategy; compose with '+'", check=credit_problem,
        allowed="a registered credit strategy (" + ", ".join(CREDIT_STRATEGIES) + "), or "
        "several joined with '+'"),
    Key("gamma_amp", "float", 1.5, "amplification of marked tokens", gt=0),
    Key("credit_apply_to", "str", "both", "shape advantages of this sign",
        choices=("both", "positive", "negative")),
    Key("credit_seed", "int", 0, "seed of the `random` strategy", ge=0),
    Key("credit_flip_fraction", "float", 0.25, "`sign_flip` (the ablation's positive "
        "control): fraction of responses whose advantage sign is flipped", ge=0, le=1),
    # ---- signals (docs/methods.md sections 1.1-1.4)
    Key("signal_layers", "int_list|null", None, "sampled layers; null = five evenly spaced in "
        "the middle third"),
    Key("signal_head_quantile", "float", 0.3, "fraction of heads (by span) taken as local / "
        "global", gt=0, le=0.5),
    Key("signal_window", "int", 10, "WAAD distance clip W (tokens)", ge=1),
    Key("signal_h_lo", "int", 10, "FAI nearest future query (tokens)", ge=1),
    Key("signal_h_hi", "int|null", 100, "FAI farthest future query (tokens); null = to the end",
        ge=1),
    Key("signal_q", "float", 0.4, "top fraction of response tokens marked preplan / anchor",
        gt=0, le=1),
    Key("preplan_by", "str", "delta", "rank preplan tokens by", choices=("delta", "waad")),
    Key("coupled_k", "int", 3, "coupled: look-back for intro tokens", ge=1),
    Key("coupled_alpha", "float", 0.5, "coupled: share of a dominated anchor's bonus moved to "
        "its intro token", ge=0, le=1),
    Key("tau_waad", "float|null", None, "coupled: WAAD threshold; null = per-response median"),
    Key("tau_delta", "float|null", None, "coupled: Delta threshold; null = per-response median"),
    Key("freeze_head_split", "bool", False, "calibrate the local/global head split on the first "
        "batch and keep it"),
    # ---- QK-score credit (docs/methods.md section 2)
    Key("qk_top_k", "int", 4, "QK: heads kept by AUC", ge=1),
    Key("qk_reselect_every", "int", 10, "QK: re-select the heads every N optimizer steps", ge=1),
    Key("qk_ema", "float", 0.9, "QK: EMA decay of the per-head AUC", ge=0, lt=1),
    Key("qk_damp", "float", 0.5, "qk_consistency: factor in [1 - qk_damp, 1]", ge=0, le=1),
    Key("qk_layers", "int_list|null", None, "QK: candidate layers; null = the signal layers"),
    Key("qk_reduce", "str", "mean", "QK: reduce the answer query's scores over its keys",
        choices=("mean", "max")),
    # ---- outcome advantages
    Key("advantage_estimator", "str", "grpo", "outcome advantage estimator (attnrl.advantages)",
        choices=ESTIMATORS),
    Key("advantage_eps", "float", 1e-4, "grpo: std epsilon", gt=0),
    Key("w_reinforce_lambda", "float", 0.1, "w_reinforce: weight of positive samples", ge=0),
    Key("correctness_threshold", "float|null", None, "psr/nsr/w_reinforce: reward >= threshold "
        "counts as correct"),
    # ---- rollout engine
    Key("rollout_engine", "str", "vllm", "vllm (in-process) | vllm_server | hf (transformers "
        "generate)", choices=("vllm", "vllm_server", "hf"), resume="allowed"),
    Key("rollout_server_url", "str|null", None, "vllm_server: base URL", resume="free"),
    Key("rollout_server_timeout", "float", 600.0, "vllm_server: seconds to wait for /health",
        gt=0, resume="free"),
    Key("rollout_server_weights_dir", "str|null", None, "vllm_server: the directory the server "
        "accepts weights from, as the trainer sees it; null = the server's", resume="free"),
    Key("rollout_kv_cache_gib", "float", 0.5, "vLLM KV cache size (GiB)", gt=0, resume="free"),
    Key("rollout_gpu_memory_utilization", "float|null", None, "vLLM GPU memory fraction", gt=0,
        le=1, resume="free"),
    Key("rollout_max_model_len", "int|null", None, "vLLM max sequence length", ge=1,
        resume="free"),
    Key("metrics_jsonl", "str|null", "metrics.jsonl", "local JSONL of every logged metric, "
        "relative to output_dir (null: off)"),
]

# TRL / transformers fields the shipped configs use, with their ranges. Defaults are TRL's
# except output_dir and logging_steps (attnrl's choice: outputs/default, 1).
TRL_KEYS = [
    Key("output_dir", "str", "outputs/default", "where checkpoints, final/, metrics and "
        "config.yaml go", resume="free"),
    Key("max_steps", "int", -1, "optimizer steps; -1 = num_train_epochs over the prompts",
        check=_check_max_steps, allowed="-1 (train num_train_epochs) or an integer >= 1",
        resume="allowed"),
    Key("num_train_epochs", "float", 3.0, "epochs when max_steps is -1", gt=0,
        resume="allowed"),
    Key("learning_rate", "float", 1e-6, "peak learning rate (> 0: at 0 nothing trains)",
        gt=0),
    Key("lr_scheduler_type", "str", "linear", "learning-rate schedule",
        choices=TRL_FIELDS["lr_scheduler_type"][2]),
    Key("warmup_steps", "float", 0, "warm-up steps (a fraction < 1: of all steps)", ge=0),
    Key("weight_decay", "float", 0.0, "AdamW weight decay", ge=0),
    Key("max_grad_norm", "float", 1.0, "gradient clipping norm (0 = off)", ge=0),
    Key("per_device_train_batch_size", "int", 8, "completions per device per micro-batch", ge=1),
    Key("gradient_accumulation_steps", "int", 1, "micro-batches per optimizer step", ge=1),
    Key("generation_batch_size", "int|null", None, "completions generated at once (multiple "
        "of the global batch and of num_generations)", ge=1),
    Key("steps_per_generation", "int|null", None, "optimizer steps per generation batch", ge=1),
    Key("num_generations", "int|null", 8, "samples per prompt (a group)", ge=2),
    Key("max_completion_length", "int|null", 512, "completion tokens at most", ge=1),
    Key("temperature", "float", 1.0, "sampling temperature", gt=0),
    Key("top_p", "float", 1.0, "nucleus sampling mass", gt=0, le=1),
    Key("top_k", "int", 0, "top-k sampling: attnrl's engines sample with temperature and "
        "top-p only, so 0 (off)", check=_engine_default(0),
        allowed="0"),
    Key("min_p", "float|null", None, "min-p sampling: not applied by attnrl's engines (null)",
        check=_engine_default(None), allowed="null"),
    Key("repetition_penalty", "float", 1.0, "repetition penalty: not applied by attnrl's "
        "engines (1.0)", check=_engine_default(1.0),
        allowed="1.0"),
    Key("generation_kwargs", "dict|null", None, "extra sampling arguments: not used by "
        "attnrl's engines (null)", check=_engine_default(None),
        allowed="null"),
    Key("beta", "float", 0.0, "KL coefficient", ge=0),
    Key("epsilon", "float", 0.2, "PPO clip range", gt=0),
    Key("num_iterations", "int", 1, "optimisation passes over each generated batch", ge=1),
    Key("loss_type", "str", "dapo", "TRL loss aggregation", choices=LOSS_TYPES),
    Key("scale_rewards", "str|bool", "group", "reward std scaling",
        choices=("group", "batch", "none")),
    Key("entropy_coef", "float", 0.0, "entropy bonus", ge=0),
    Key("multi_objective_aggregation", "str", "sum_then_normalize", "how rewards combine: "
        "attnrl's estimators take their weighted sum", check=_check_reward_aggregation,
        allowed="sum_then_normalize"),
    Key("seed", "int", 42, "seed of model init, data order and sampling", ge=0),
    Key("bf16", "bool|null", None, "bfloat16 mixed precision (null: follows the machine, "
        "trainers/machine.py: on where a GPU supports it, off on CPU)"),
    Key("use_cpu", "bool|null", None, "train on CPU (null: follows the machine: true when no "
        "CUDA device is visible)"),
    Key("gradient_checkpointing", "bool", True, "recompute activations in backward"),
    Key("deepspeed", "str|dict|null", None, "DeepSpeed config: JSON file, a dict, or zero2 | "
        "zero3 | zero3_offload (configs/deepspeed)"),
    Key("logging_steps", "float", 1, "log every N steps", gt=0, resume="free"),
    Key("save_steps", "float", 500, "checkpoint every N steps", gt=0, resume="free"),
    Key("save_total_limit", "int|null", None, "checkpoints kept", ge=1, resume="free"),
    Key("save_strategy", "str", "steps", "when to checkpoint",
        choices=TRL_FIELDS["save_strategy"][2], resume="free"),
    Key("report_to", "str|list|null", "none", "loggers: none, wandb, tensorboard, ...",
        check=_check_report_to, allowed="none, all, or a list of " + ", ".join(REPORT_TO[2:]),
        resume="free"),
    Key("run_name", "str|null", None, "run name in the loggers", resume="free"),
]

NSR_DEFAULTS = {"advantage_estimator": "nsr", "loss_type": "bnpo", "scale_rewards": "none",
                "epsilon": 0.2, "beta": 0.0, "num_iterations": 1, "entropy_coef": 0.001}
"""NSRConfig's defaults where they differ from AttnGRPOConfig's (trainer: nsr)."""

FREE_TRL_FIELDS = {"logging_first_step", "logging_strategy", "log_level", "log_level_replica",
                   "disable_tqdm", "log_completions", "num_completions_to_print", "project",
                   "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
                   "hub_private_repo", "dataloader_num_workers", "save_only_model",
                   "save_on_each_node", "skip_memory_metrics", "ddp_timeout"}
"""Generic TRL fields that never change what a run computes (bookkeeping)."""

ATTNRL_DEFAULT_TRL = {"output_dir", "logging_steps"}
"""TRL fields whose default here is attnrl's, not TRL's (always passed to the trainer)."""
MACHINE_DEFAULT_TRL = {"use_cpu", "bf16"}
"""TRL fields whose default (null) is chosen from the machine when a job starts
(trainers/machine.py), not TRL's."""


def _generic_key(name: str) -> Key:
    kinds, default, choices = TRL_FIELDS[name]
    return Key(name, kinds, default, "TRL GRPOConfig field", choices=tuple(choices or ()),
               resume="free" if name in FREE_TRL_FIELDS else "fixed")


KEYS: dict[str, Key] = {k.name: k for k in JOB_KEYS + ATTNRL_KEYS + TRL_KEYS}
KEYS.update({name: _generic_key(name) for name in TRL_FIELDS if name not in KEYS})
JOB_KEY_NAMES = tuple(k.name for k in JOB_KEYS)
DECLARED = tuple(k.name for k in JOB_KEYS + ATTNRL_KEYS + TRL_KEYS)


def default(name: str, trainer: str = "grpo"):
    if trainer == "nsr" and name in NSR_DEFAULTS:
        return NSR_DEFAULTS[name]
    return KEYS[name].default


# ------------------------------------------------------------------ checking values
class _Bad(Exception):
    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def coerce(key: Key, value):
    """The value as the key takes it (e.g. '1e-5' -> 1e-05 for a number, 3.0 -> 3 for an
    integer), or _Bad with the problem."""
    kinds = set(key.kinds.split("|"))
    if "any" in kinds:
        return value
    kind = _kind_of(value)
    if kind == "str" and kinds & {"float", "int"}:  # YAML 1.1 reads '1e-5' as text
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and "str" not in kinds:
            value, kind = number, "float"
    if kind == "float" and "int" in kinds and "float" not in kinds:
        if not math.isfinite(value) or value != int(value):
            raise _Bad("is not an integer")
        value, kind = int(value), "int"
    if kind == "int" and "float" in kinds and "int" not in kinds:
        kind = "float"  # an integer is a number (kept as written: 4, not 4.0)
    if kind in ("int", "float") and "str" in kinds and not kinds & {"int", "float"}:
        value, kind = str(value), "str"  # e.g. --run_name 7
    if kind == "list" and "int_list" in kinds:
        if not all(_kind_of(v) == "int" for v in value):
            raise _Bad("is not a list of integers")
        kind = "int_list"
    if kind not in kinds:
        wanted = " or ".join(_KIND_TEXT[k] for k in key.kinds.split("|"))
        raise _Bad(f"is {_KIND_TEXT.get(kind, kind)}, not {wanted}")
    if kind == "float" and not math.isfinite(value):
        raise _Bad("is not finite")
    if key.choices and kind == "str" and value not in key.choices:
        raise _Bad(f"is not a choice{nearest(value, key.choices)}")
    if kind in ("int", "float"):
        for bound, ok in ((key.ge, lambda b: value >= b), (key.gt, lambda b: value > b),
                          (key.le, lambda b: value <= b), (key.lt, lambda b: value < b)):
            if bound is not None and not ok(bound):
                raise _Bad("is out of range")
    if key.check is not None and value is not None:
        problem = key.check(value)
        if problem:
            raise _Bad(problem)
    return value


def check_value(name: str, value, where: str, bare: bool = False):
    """The checked value of key `name`, or UserError naming key, value, what is allowed and
    where the value came from."""
    key = KEYS[name]
    if bare:
        if "bool" in key.kinds.split("|"):
            return True
        raise UserError(f"{where}: --{name} given without a value; write --{name} VALUE "
                        f"({name} takes {key.describe()})")
    try:
        return coerce(key, value)
    except _Bad as bad:
        if bad.problem.startswith((f"{name}.", f"{name} ")):  # the text says it all
            raise UserError(f"{where}: {bad.problem}") from None
        if bad.problem.startswith("unknown"):  # a registry name
            raise UserError(f"{where}: {name}: {bad.problem}") from None
        if key.choices and "not a choice" in bad.problem:
            raise UserError(f"{where}: unknown {name} {value!r}{nearest(value, key.choices)}; "
                            f"{name} takes {key.describe()}") from None
        raise UserError(f"{where}: {name} = {value!r} {bad.problem}; {name} takes "
                        f"{key.describe()}") from None


def unknown_key(name: str, where: str) -> UserError:
    return UserError(f"{where}: unknown config key {name!r}{nearest(name, KEYS)}; job keys: "
                     f"{', '.join(JOB_KEY_NAMES)}; the rest are trainer fields (trainers/"
                     "schema.py)")


def check_config(config: dict, sources: dict[str, str] | None = None,
                 bare: set[str] | frozenset = frozenset(), source: str = "config") -> dict:
    """Every key known and every value allowed, then the rules between keys. Returns the
    checked config (values normalised, e.g. '1e-5' -> 1e-05); `sources[key]` says where a
    value came from (file path or 'command line')."""
    sources = sources or {}
    checked = {}
    for name, value in config.items():
        where = sources.get(name, source)
        if name not in KEYS:
            raise unknown_key(name, where)
        checked[name] = check_value(name, value, where, bare=name in bare)
    _check_together(checked, lambda *names: " and ".join(
        sorted({sources.get(n, source) for n in names if n in checked} or {source})))
    return checked


def world_size() -> int:
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def top_p_problem(top_p, is_correction) -> str | None:
    """Why top_p < 1 cannot train with TRL's importance-sampling correction on: the engines
    return nucleus-renormalised log-probs (the distribution sampled from) while TRL's are of
    the full softmax, so the correction weighs each sequence by the product of its tokens'
    nucleus masses (0.9 at top_p 0.9, per token: about 0.007 for 48 tokens) and the
    gradient vanishes. None when the combination is fine."""
    if top_p is not None and top_p < 1 and is_correction:
        return (f"top_p {top_p:g} with vllm_importance_sampling_correction: the correction "
                "would multiply each answer's gradient by its tokens' nucleus masses (about "
                f"{top_p:g}^length); set top_p: 1.0, or vllm_importance_sampling_correction: "
                "false (then TRL's loss uses the full softmax)")
    return None


def liger_problem(use_liger) -> str | None:
    """Why use_liger_kernel is refused: TRL's liger loss never calls the per-token log-prob
    code where attnrl shapes the advantages, so every credit strategy would be dropped."""
    if use_liger:
        return ("use_liger_kernel: true would bypass attnrl's credit (TRL's liger loss never "
                "computes the per-token advantages); set use_liger_kernel: false")
    return None


def _check_together(config: dict, where) -> None:
    trainer = config.get("trainer", "grpo")

    def get(name):
        return config.get(name, default(name, trainer))

    problem = top_p_problem(get("top_p"), get("vllm_importance_sampling_correction"))
    if problem:
        raise UserError(f"{where('top_p', 'vllm_importance_sampling_correction')}: {problem}")
    problem = liger_problem(get("use_liger_kernel"))
    if problem:
        raise UserError(f"{where('use_liger_kernel')}: {problem}")
    if get("rollout_engine") == "vllm_server" and not get("rollout_server_url"):
        raise UserError(f"{where('rollout_engine', 'rollout_server_url')}: rollout_engine "
                        "vllm_server needs rollout_server_url, the server's base URL (e.g. "
                        "http://127.0.0.1:8000; start one with launch/vllm_server.sh)")

    from trainers.heldout_keys import HELDOUT_INPUTS, heldout_settings

    try:
        heldout_settings({name: get(name) for name in HELDOUT_INPUTS})
    except UserError as err:
        raise UserError(f"{where('eval_size', 'eval_task', 'eval_seed', 'task')}: {err}") \
            from None
    per_device, accum = get("per_device_train_batch_size"), get("gradient_accumulation_steps")
    gen_batch, steps = get("generation_batch_size"), get("steps_per_generation")
    n = get("num_generations")
    batch = per_device * world_size()
    names = ("generation_batch_size", "steps_per_generation")
    if gen_batch is not None and steps is not None:
        raise UserError(f"{where(*names)}: set generation_batch_size or steps_per_generation, "
                        "not both")
    if gen_batch is not None and gen_batch % batch:
        raise UserError(f"{where('generation_batch_size', 'per_device_train_batch_size')}: "
                        f"generation_batch_size {gen_batch} is not a multiple of the global "
                        f"batch {batch} (per_device_train_batch_size x {world_size()} "
                        "processes)")
    if gen_batch is None:
        gen_batch = batch * (steps or accum)
    if n is not None and gen_batch % n:
        raise UserError(f"{where('num_generations', 'per_device_train_batch_size', *names)}: "
                        f"num_generations {n} does not divide the generation batch {gen_batch} "
                        f"(per_device_train_batch_size {per_device} x {world_size()} processes "
                        f"x {steps or accum} steps); make the batch a multiple of {n}")
    h_lo, h_hi = get("signal_h_lo"), get("signal_h_hi")
    if h_hi is not None and h_hi < h_lo:
        raise UserError(f"{where('signal_h_lo', 'signal_h_hi')}: signal_h_hi {h_hi} < "
                        f"signal_h_lo {h_lo}; the FAI window needs h_lo <= h_hi")
    check_layers(config, where)
    check_attention(config, get, where)
    check_lora_tied(config, get, where)
    rewards = get("rewards") or {}
    for name in (get("reward_options") or {}):
        if name not in rewards:
            raise UserError(f"{where('reward_options', 'rewards')}: reward_options names "
                            f"{name!r}, which is not in rewards ({', '.join(rewards)})")


def model_layers(model: str) -> int | None:
    """num_hidden_layers of a model name or local directory, read without loading it."""
    return layer_count(model)


def check_layers(config: dict, where) -> None:
    """signal_layers / qk_layers inside the model's layer range."""
    for key in ("signal_layers", "qk_layers"):
        problem = layers_problem(config.get(key), config.get("model", "smollm2"))
        if problem:
            raise UserError(f"{where(key, 'model')}: {key} {problem}")


def check_lora_tied(config: dict, get, where) -> None:
    """LoRA (or modules_to_save) on lm_head of a model with tied embeddings is refused: the
    rollout engines load one tensor for the pair, so lm_head's delta would be lost (vLLM)
    or written over the input embedding (transformers)."""
    lora = get("lora")
    if not isinstance(lora, dict):
        return
    targets = lora.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    saved = list(lora.get("modules_to_save") or [])
    touched = [t for t in targets + saved if str(t).split(".")[-1] in ("lm_head",
                                                                        "embed_tokens")]
    if not touched:
        return
    from attnrl.attention_config import read_config

    model = config.get("model", "smollm2")
    model_config = read_config(model)
    tied = str(model).lower() in {n.lower() for n in SMOLLM2_NAMES} if model_config is None \
        else model_config.get("tie_word_embeddings", False)
    if tied:
        raise UserError(f"{where('lora', 'model')}: lora on {', '.join(map(str, touched))} of "
                        f"{model}, whose lm_head is tied to its input embedding: the rollout "
                        "engines load one tensor for both, so the update would be lost or "
                        "applied twice; leave lm_head and embed_tokens out of lora")


def check_attention(config: dict, get, where) -> None:
    """Credit that reads the attention only where it can be read exactly, decided from the
    model's config.json before the model loads: no attention logit softcapping (the
    capture and the QK scores run sdpa, which drops it), and sampled layers that are
    softmax attention (not linear attention / state-space layers, which have no map)."""
    from attnrl.attention_config import (
        attention_softcap,
        default_layers,
        non_softmax_layers,
        read_config,
    )

    reads = {ATTENTION_CREDIT[p] for p in str(get("credit")).split("+")
             if p.strip() in ATTENTION_CREDIT}
    model = config.get("model", "smollm2")
    model_config = read_config(model) if reads else None
    if model_config is None:
        return
    softcap = attention_softcap(model_config)
    if softcap:
        raise UserError(f"{where('credit', 'model')}: credit {get('credit')} reads the "
                        f"attention of {model}, whose logits are softcapped "
                        f"(attn_logit_softcapping={softcap:g}), which the capture cannot "
                        "compute exactly; use a credit without attention (uniform, random, "
                        "entropy) for this model")
    count = model_config.get("num_hidden_layers")
    if count is None:
        return
    signal_layers = get("signal_layers") or default_layers(count, 5)
    keys = {"signals": ("signal_layers", signal_layers),
            "qk": ("qk_layers" if get("qk_layers") else "signal_layers",
                   get("qk_layers") or signal_layers)}
    for kind in sorted(reads):
        key, layers = keys[kind]
        bad = non_softmax_layers(model_config, layers)
        if bad:
            softmax = [i for i in range(count) if i not in non_softmax_layers(
                model_config, list(range(count)))]
            raise UserError(f"{where(key, 'model')}: {key} {sorted(bad)} of {model} are "
                            f"{', '.join(sorted(set(bad.values())))} layers (its layer_types), "
                            f"which have no attention map; set {key} to softmax-attention "
                            f"layers, e.g. {softmax[len(softmax) // 3:][:5]}")


def resolve(config: dict) -> dict:
    """Every declared key with its value (given or default), then the other TRL fields that
    were given: the config that runs, as written to OUTPUT_DIR/config.yaml."""
    trainer = config.get("trainer", "grpo")
    resolved = {name: config.get(name, default(name, trainer)) for name in DECLARED}
    resolved.update({k: v for k, v in config.items() if k not in resolved})
    if resolved["resume"] is True:
        resolved["resume"] = "auto"
    elif resolved["resume"] is False:
        resolved["resume"] = "never"
    return resolved


def parse_allow_list(text: str | None) -> set[str]:
    """'max_steps,rollout_engine' -> names, each a key that may change on resume."""
    names = {n.strip() for n in re.split(r"[,\s]+", text or "") if n.strip()}
    for name in sorted(names):
        if name not in KEYS:
            raise UserError(f"command line: --allow_config_change names unknown key {name!r}"
                            f"{nearest(name, KEYS)}")
        if KEYS[name].resume == "fixed":
            movable = sorted(k.name for k in KEYS.values() if k.resume == "allowed")
            raise UserError(f"command line: --allow_config_change {name}: {name} cannot change "
                            f"when a run resumes (it changes what the run computes); start a "
                            f"new run (new output_dir, or resume: never --overwrite). Keys "
                            f"that may change: {', '.join(movable)}")
    return names
