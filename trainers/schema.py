"""The schema of a training config: every key with its type, range or choices, default and
meaning, checked before anything heavy (torch, vLLM, TRL) is imported.

A config is one flat mapping of
- job keys (JOB_KEYS): what to train on, read by trainers/job.py and trainers/cli.py;
- attnrl's trainer fields (ATTNRL_KEYS): the fields AttnGRPOConfig adds to TRL's GRPOConfig;
- TRL's fields: the ones declared in TRL_KEYS with ranges, and every other GRPOConfig field
  with the type and default recorded in trainers/trl_fields.py (generated from TRL).

This module checks whole configs (check_config, check_value), fills in the defaults
(resolve) and reads --allow_config_change (parse_allow_list); it also re-exports the
schema's parts, so `from trainers.schema import ...` reaches all of them:
    trainers/schema_key.py           Key (one key's declaration) and coerce (one value)
    trainers/schema_names.py         registries and lists values are checked against
    trainers/schema_checks.py        checks of single values (Key's `check=`), check_paths
    trainers/schema_declarations.py  the keys: JOB_KEYS, ATTNRL_KEYS, TRL_KEYS, KEYS, default
    trainers/schema_rules.py         rules between keys (batch sizes, layers, attention, ...)
    trainers/schema_engine.py        TRL's generation / model-loading fields: mapped onto
                                     attnrl's keys, used, or refused; the IS-mode default
Adding a key is one declaration, `Key(name, kinds, default, doc, ...)`, in
trainers/schema_declarations.py (see there).
"""

from __future__ import annotations

import re

from attnrl.cli_checks import SMOLLM2_NAMES
from attnrl.credit_names import (
    ATTENTION_CREDIT,
    CREDIT_STRATEGIES,
    SIGNED_CREDIT,
    credit_problem,
)
from attnrl.errors import UserError, nearest
from trainers.schema_checks import check_paths
from trainers.schema_declarations import (
    ATTNRL_DEFAULT_TRL,
    ATTNRL_KEYS,
    DECLARED,
    FREE_TRL_FIELDS,
    JOB_KEY_NAMES,
    JOB_KEYS,
    KEYS,
    MACHINE_DEFAULT_TRL,
    NSR_DEFAULTS,
    TRL_KEYS,
    default,
)
from trainers.schema_engine import TRL_ENGINE_KEYS, TRL_TO_ATTNRL, default_is_mode, map_trl_keys
from trainers.schema_key import BadValue, Key, coerce
from trainers.schema_names import (
    ESTIMATORS,
    LORA_ALIASES,
    LORA_KEYS,
    LOSS_TYPES,
    REPORT_TO,
    REWARDS,
)
from trainers.schema_rules import (
    check_attention,
    check_layers,
    check_lora_tied,
    check_together,
    liger_problem,
    model_layers,
    top_p_problem,
    world_size,
)
from trainers.trl_fields import TRL_FIELDS

__all__ = [  # the schema's parts, re-exported: import them from here
    "ATTENTION_CREDIT", "ATTNRL_DEFAULT_TRL", "ATTNRL_KEYS", "CREDIT_STRATEGIES",
    "DECLARED", "ESTIMATORS", "FREE_TRL_FIELDS", "JOB_KEYS", "JOB_KEY_NAMES", "KEYS",
    "LORA_ALIASES", "LORA_KEYS", "LOSS_TYPES", "MACHINE_DEFAULT_TRL", "NSR_DEFAULTS",
    "REPORT_TO", "REWARDS", "SIGNED_CREDIT", "SMOLLM2_NAMES", "TRL_ENGINE_KEYS",
    "TRL_FIELDS", "TRL_KEYS", "TRL_TO_ATTNRL", "Key", "check_attention", "check_config",
    "check_layers", "check_lora_tied", "check_paths", "check_value", "coerce",
    "credit_problem", "default", "default_is_mode",
    "liger_problem", "model_layers", "parse_allow_list", "resolve", "top_p_problem",
    "unknown_key", "world_size",
]


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
    except BadValue as bad:
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
    """Every key known and every value allowed, TRL's names of attnrl's engine settings
    replaced by attnrl's (trainers/schema_engine.py), then the rules between keys. Returns
    the checked config (values normalised, e.g. '1e-5' -> 1e-05); `sources[key]` says where
    a value came from (file path or 'command line')."""
    sources = dict(sources or {})
    checked = {}
    for name, value in config.items():
        where = sources.get(name, source)
        if name not in KEYS:
            raise unknown_key(name, where)
        checked[name] = check_value(name, value, where, bare=name in bare)
    checked = map_trl_keys(checked, sources, source, check_value)
    check_together(checked, lambda *names: " and ".join(
        sorted({sources.get(n, source) for n in names if n in checked} or {source})))
    return checked


def resolve(config: dict) -> dict:
    """Every declared key with its value (given or default), then the other TRL fields that
    were given: the config that runs, as written to OUTPUT_DIR/config.yaml. A plug-in
    reward's file (rewards/plugins.py) is made absolute, from the working directory."""
    trainer = config.get("trainer", "grpo")
    resolved = {name: config.get(name, default(name, trainer)) for name in DECLARED}
    resolved.update({k: v for k, v in config.items() if k not in resolved})
    if resolved["vllm_importance_sampling_mode"] is None:
        resolved["vllm_importance_sampling_mode"] = default_is_mode(
            resolved["max_completion_length"], resolved["loss_type"], resolved["rollout_lag"])
    if resolved["resume"] is True:
        resolved["resume"] = "auto"
    elif resolved["resume"] is False:
        resolved["resume"] = "never"
    from rewards.plugins import absolute  # a plug-in file's path: from the working directory

    resolved["rewards"] = {absolute(k): v for k, v in resolved["rewards"].items()}
    if resolved["reward_options"]:
        resolved["reward_options"] = {absolute(k): v for k, v in
                                      resolved["reward_options"].items()}
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
