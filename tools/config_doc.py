"""Write docs/configuration.md, the reference of every `attnrl train` config key, from the
config schema (trainers/schema.py, whose TRL fields come from trainers/trl_fields.py), the
LoRA keys and the reward registry. Imports nothing heavy (no torch, TRL or vLLM).

    .venv/bin/python -m tools.config_doc            # rewrite docs/configuration.md
    .venv/bin/python -m tools.config_doc --check    # exit 1 if the page is out of date

tests/test_docs.py fails when the committed page differs from `render()`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "configuration.md"
COMMAND = ".venv/bin/python -m tools.config_doc"

RESUME_TEXT = {
    "fixed": "new run",
    "allowed": "with `--allow_config_change`",
    "free": "any time",
}


def _names(*names: str) -> Callable[[str], bool]:
    wanted = set(names)
    return lambda name: name in wanted


def _prefixes(*prefixes: str, also: Iterable[str] = ()) -> Callable[[str], bool]:
    extra = set(also)
    return lambda name: name.startswith(prefixes) or name in extra


# (title, what the group is, which keys) per part of the schema, in page order; a key no
# rule claims goes to an "Other" table of its part, so a new key is never left out.
JOB_GROUPS = [
    ("Model and data", "What is trained and on which prompts.",
     _names("model", "task", "task_size", "task_seed", "task_kwargs", "question_field",
            "answer_field", "max_prompt_length", "instruction", "system_prompt")),
    ("Rewards", """Reward functions and their weights (the registry: [Rewards](#rewards)), or
     plug-ins of your own ([recipes](recipes.md#your-own-reward)).""",
     _names("rewards", "reward_options", "reward_plugins")),
    ("Trainer, run directory and logging", "",
     _names("trainer", "lora", "dtype", "resume", "wandb_project", "recorded")),
    ("Held-out evaluation",
     """Problems the run never trains on, evaluated before and after training (and every
     `eval_every` steps).""", _prefixes("eval_")),
    ("Reasoning vector", "A merge after training (docs/methods.md section 4).",
     _names("reasoning_vector")),
]
ATTNRL_GROUPS = [
    ("Credit", "How the outcome advantage is spread over tokens (docs/methods.md section 1.5).",
     _prefixes("credit", also=("gamma_amp",))),
    ("Attention signals", "WAAD, FAI and the token sets (docs/methods.md sections 1.1-1.4).",
     _prefixes("signal_", "coupled_", "tau_", also=("preplan_by", "freeze_head_split"))),
    ("QK-score credit", "docs/methods.md section 2.", _prefixes("qk_")),
    ("Outcome advantages", "docs/methods.md sections 3 and 6.",
     _names("advantage_estimator", "advantage_eps", "w_reinforce_lambda",
            "correctness_threshold")),
    ("Rollout engine", "", _prefixes("rollout_")),
    ("Metrics", "", _names("metrics_jsonl")),
]
TRL_GROUPS = [
    ("Length of training and optimiser", "",
     _names("output_dir", "max_steps", "num_train_epochs", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed")),
    ("Batches and generation", "",
     _names("per_device_train_batch_size", "gradient_accumulation_steps",
            "generation_batch_size", "steps_per_generation", "num_generations",
            "max_completion_length")),
    ("Sampling",
     """attnrl's engines sample with temperature and top-p only; the other sampling keys
     accept only their neutral value.""",
     _names("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "generation_kwargs")),
    ("Loss", "docs/methods.md section 6.",
     _names("beta", "epsilon", "num_iterations", "loss_type", "scale_rewards", "entropy_coef",
            "multi_objective_aggregation", "vllm_importance_sampling_mode")),
    ("Device, precision and memory", "",
     _names("bf16", "use_cpu", "gradient_checkpointing", "deepspeed")),
    ("Checkpoints and loggers", "",
     _names("logging_steps", "save_steps", "save_total_limit", "save_strategy", "report_to",
            "run_name")),
]

INTRO = f"""
Every key an `attnrl train` config may hold. A config is one flat YAML mapping; any key can
also be given on the command line as `--key value` (read as YAML). Values are checked against
this schema ([trainers/schema.py](../trainers/schema.py)) before anything heavy is imported;
a bad one exits with code 2 and one line naming the key. `OUTPUT_DIR/config.yaml` of a run
records every key with the value it ran with.

This page is generated: after changing the schema run `{COMMAND}` (tests/test_docs.py fails
while the page differs from what it generates).

Columns: *default* is the value when the key is absent; *takes* the values accepted; *on
resume* whether a run in an existing output_dir may continue with a changed value (`new
run`: no, start another run; `with --allow_config_change`: when named there; `any time`:
bookkeeping). Rules between keys (batch divisibility, `signal_h_lo <= signal_h_hi`, `top_p
< 1` with TRL's importance-sampling correction, layer ranges of the model, ...) are checked
too.

Contents: [job keys](#job-keys), [attnrl trainer fields](#attnrl-trainer-fields), [TRL
fields with ranges](#trl-fields-with-ranges), [TRL's generation and model-loading
fields](#trls-generation-and-model-loading-fields), [other TRL fields](#other-trl-fields),
[LoRA](#lora), [rewards](#rewards).
"""
JOB_TEXT = """What to train on and how the job runs; read by the job
([trainers/job.py](../trainers/job.py)), not passed to the trainer."""
ATTNRL_TEXT = """Fields `AttnGRPOConfig` ([trainers/grpo_config.py](../trainers/grpo_config.py)) adds to
TRL's `GRPOConfig`. Formulas and the [P] / [D] tags of their defaults:
[methods.md](methods.md)."""
TRL_TEXT = """Fields of TRL's `GRPOConfig` that the shipped configs use, declared with
ranges. Defaults are TRL's except where noted; under `trainer: nsr` `NSRConfig`
([trainers/nsr.py](../trainers/nsr.py)) changes some (noted)."""
ENGINE_TEXT = """TRL's fields for its own generation backends (its vLLM engine and server,
transformers generation) and for loading the model
([trainers/schema_engine.py](../trainers/schema_engine.py)). attnrl generates with its own
engine (`rollout_engine`) and loads the policy itself, so each of these either works, is
TRL's name of an attnrl key (mapped onto it: the run records attnrl's key; giving both with
different values is refused), or accepts only TRL's default (any other value: exit 2, one
line saying what to write instead). `vllm_importance_sampling_correction`, `_clip_max`,
`_clip_min` (and the deprecated `_cap`) are TRL's and apply as in TRL (attnrl's engines
return the log-probs TRL's vLLM does)."""
GENERIC_TEXT = """Every other field of TRL's `GRPOConfig` (TRL {version}), with the type and
default recorded in [trainers/trl_fields.py](../trainers/trl_fields.py) (generated from the
installed TRL by `python -m trainers.schema_sync`). They are passed to TRL unchanged; their
meaning is TRL's documentation."""
LORA_TEXT = """`lora: {...}` takes these PEFT `LoraConfig` fields; absent `task_type` is
`CAUSAL_LM` and absent `target_modules` is `all-linear`. LoRA on `lm_head` or `embed_tokens`
of a model with tied embeddings is refused."""
REWARDS_TEXT = """Names for `rewards: {name: weight}`; the reward of a completion is the
weighted sum. `reward_options: {name: {option: value}}` sets a reward's options. Beside
these, a plug-in of your own: `module:function` or `path/to/file.py:function` with TRL's
signature ([rewards/plugins.py](../rewards/plugins.py), [recipes](recipes.md#your-own-reward))."""


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each on one line, with a blank line between."""
    out: list[str] = []
    for block in text.strip().split("\n\n"):
        out += [" ".join(block.split()), ""]
    return out[:-1]


def _cell(text) -> str:
    """Text for a markdown table cell: one line, '|' escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(value) -> str:
    """A default as it would be written in YAML, in backticks."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    text = text.strip().removesuffix("...").strip()
    return f"`{' '.join(text.split())}`"


def _default(key, schema) -> str:
    text = _value(key.default)
    if key.name in schema.NSR_DEFAULTS and schema.NSR_DEFAULTS[key.name] != key.default:
        text += f" (`trainer: nsr`: {_value(schema.NSR_DEFAULTS[key.name])})"
    if key.name in schema.MACHINE_DEFAULT_TRL:
        text += " (chosen from the machine at start)"
    if key.name in schema.ATTNRL_DEFAULT_TRL:
        from trainers.trl_fields import TRL_FIELDS

        text += f" (TRL's: {_value(TRL_FIELDS[key.name][1])})"
    return text


def _table(keys, schema) -> list[str]:
    lines = ["| key | default | takes | on resume | meaning |",
             "| --- | --- | --- | --- | --- |"]
    for key in keys:
        lines.append(f"| `{key.name}` | {_cell(_default(key, schema))} | {_cell(key.describe())} | "
                     f"{RESUME_TEXT[key.resume]} | {_cell(key.doc)} |")
    return lines


def _grouped(keys, groups, schema, level: str = "###") -> list[str]:
    lines: list[str] = []
    left = list(keys)
    for title, text, rule in groups:
        chosen = [k for k in left if rule(k.name)]
        if not chosen:
            continue
        left = [k for k in left if k not in chosen]
        lines += ["", f"{level} {title}", ""]
        if text:
            lines += _paragraphs(text) + [""]
        lines += _table(chosen, schema)
    if left:
        lines += ["", f"{level} Other", ""] + _table(left, schema)
    return lines


def _lora_lines(schema) -> list[str]:
    lines = ["| key | takes |", "| --- | --- |"]
    for name, (kinds, extra) in schema.LORA_KEYS.items():
        key = schema.Key(f"lora.{name}", kinds, None, "", **extra)
        lines.append(f"| `{name}` | {_cell(key.describe())} |")
    aliases = ", ".join(f"`{a}` (write `{n}`)" for a, n in schema.LORA_ALIASES.items())
    return lines + ["", f"Refused with a hint: {aliases}."]


def _reward_lines() -> list[str]:
    import rewards

    lines = ["| reward | options (`reward_options`) | what it gives |", "| --- | --- | --- |"]
    for name, fn in rewards.REWARDS.items():
        options = [p for p in inspect.signature(fn).parameters.values()
                   if p.name not in rewards._DATA_PARAMS and p.name != "columns"
                   and p.kind is not inspect.Parameter.VAR_KEYWORD]
        text = ", ".join(f"`{p.name}` (default {_value(p.default)})" for p in options) or "none"
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0]
        lines.append(f"| `{name}` | {_cell(text)} | {_cell(doc)} |")
    return lines


def render() -> str:
    """The page, from the schema as it is now."""
    from trainers import schema
    from trainers.trl_fields import TRL_VERSION

    declared_trl = {k.name for k in schema.TRL_KEYS + schema.TRL_ENGINE_KEYS}
    generic = [schema.KEYS[n] for n in schema.KEYS
               if n not in schema.DECLARED and n not in declared_trl]
    lines = ["# Configuration", "",
             f"<!-- Generated by `{COMMAND}` from trainers/schema.py; do not edit by hand. -->",
             ""]
    lines += _paragraphs(INTRO)
    lines += ["", "## Job keys", ""] + _paragraphs(JOB_TEXT)
    lines += _grouped(schema.JOB_KEYS, JOB_GROUPS, schema)
    lines += ["", "## attnrl trainer fields", ""] + _paragraphs(ATTNRL_TEXT)
    lines += _grouped(schema.ATTNRL_KEYS, ATTNRL_GROUPS, schema)
    lines += ["", "## TRL fields with ranges", ""] + _paragraphs(TRL_TEXT)
    lines += _grouped(schema.TRL_KEYS, TRL_GROUPS, schema)
    lines += ["", "## TRL's generation and model-loading fields", ""]
    lines += _paragraphs(ENGINE_TEXT) + [""] + _table(schema.TRL_ENGINE_KEYS, schema)
    lines += ["", "## Other TRL fields", ""]
    lines += _paragraphs(GENERIC_TEXT.format(version=TRL_VERSION))
    lines += [""] + _table(generic, schema)
    lines += ["", "## LoRA", ""] + _paragraphs(LORA_TEXT) + [""] + _lora_lines(schema)
    lines += ["", "## Rewards", ""] + _paragraphs(REWARDS_TEXT) + [""] + _reward_lines()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.config_doc",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md differs from the generated page")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(REPO)} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
