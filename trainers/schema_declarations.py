"""Every key of a training config, declared: JOB_KEYS (what to train on, read by
trainers/job.py and trainers/cli.py), ATTNRL_KEYS (the fields AttnGRPOConfig adds to TRL's
GRPOConfig), TRL_KEYS (the TRL fields the shipped configs use, with ranges) and, generated
from trainers/trl_fields.py, every other GRPOConfig field with TRL's type and default; then
KEYS (all of them by name) and `default`, which knows NSRConfig's defaults.

Adding a key is one declaration, `Key(name, kinds, default, doc, ...)` (its arguments:
trainers/schema_key.py), in the list it belongs to; a job key is then read with
`config[name]` (the resolved config holds every key), a trainer field must also be declared
on AttnGRPOConfig with the same default (tests/trainers/test_schema.py checks both
directions). docs/configuration.md is generated from these lists (tools/config_doc.py).
"""

from __future__ import annotations

from attnrl.credit_names import CREDIT_STRATEGIES, credit_problem
from trainers.schema_checks import (
    engine_default,
    field_name_problem,
    lora_problem,
    max_steps_problem,
    reasoning_vector_problem,
    report_to_problem,
    resume_problem,
    reward_aggregation_problem,
    reward_options_problem,
    rewards_problem,
)
from trainers.schema_engine import IS_MODES, LONG_COMPLETION, LONG_IS_MODE, TRL_ENGINE_KEYS
from trainers.schema_key import Key
from trainers.schema_names import ATTN_IMPLEMENTATIONS, ESTIMATORS, LOSS_TYPES, REPORT_TO
from trainers.trl_fields import TRL_FIELDS

JOB_KEYS = [
    Key("model", "str", "smollm2", "local HF model directory or 'smollm2' (the packaged "
        "SmolLM2-135M-Instruct); checked to exist when the job starts (check_paths)"),
    Key("task", "str", "chain_sum", "reasoning-gym task name, 'gsm8k:train' / 'gsm8k:test', or "
        "a data file: .jsonl, .json (an array or one object per line), .csv, .parquet, or a "
        "saved Hugging Face dataset directory (DIR, or DIR:SPLIT of a DatasetDict); a path is "
        "relative to the working directory; checked, every row, when the job starts"),
    Key("task_size", "int", 64, "number of training prompts (a data file: its first N rows; "
        "more than the file holds is refused when the job starts)", ge=1),
    Key("task_seed", "int", 0, "seed of the task generator", ge=0),
    Key("task_kwargs", "dict|null", None, "extra arguments of the reasoning-gym task (e.g. "
        "min_terms), checked against the task's config class before anything loads; a --task "
        "override on the command line drops the config file's task_kwargs"),
    Key("question_field", "str", "question", "the field (column) of a data file's rows that "
        "holds the question, for task and eval_task (not the bundled gsm8k)",
        check=field_name_problem, allowed="a field name"),
    Key("answer_field", "str", "answer", "the field (column) that holds the gold answer (a bare "
        "answer, or a solution whose text after the last '####' is the answer)",
        check=field_name_problem, allowed="a field name"),
    Key("max_prompt_length", "int|null", None, "prompt tokens at most (question + instruction "
        "through the chat template, as the trainer tokenizes it): of the task_size prompts, "
        "longer ones are dropped when the dataset is built (after the tokenizer loads, before "
        "the model), the count printed and recorded in config.yaml (recorded.data); none left: "
        "refused (null: no cap)", ge=1),
    Key("instruction", "str|null", None, "text appended to each question ('' = none; null: the "
        "default '####' one)"),
    Key("system_prompt", "str|null", None, "optional system message"),
    Key("rewards", "dict", {"answer": 1.0}, "{reward: weight}: names from rewards.REWARDS, or "
        "plug-ins 'module:function' / 'path/to/file.py:function' (a path relative to the working "
        "directory, recorded absolute) with TRL's signature f(prompts, completions, **kwargs) -> "
        "list[float]; imported and checked when the job starts (rewards/plugins.py)",
        check=rewards_problem, allowed="a mapping {reward: weight}"),
    Key("reward_options", "dict|null", None, "{reward: {option: value}}: keyword options, each a "
        "named parameter of the reward's function (plug-ins too)",
        check=reward_options_problem, allowed="a mapping {reward: {option: value}}"),
    Key("reward_plugins", "dict|null", None, "written by `attnrl train` when the job starts: "
        "{plug-in: {file, sha256}} of each plug-in reward's source file (a value given is "
        "replaced); compared when a run resumes, so a changed plug-in file is a new run"),
    Key("trainer", "str", "grpo", "grpo | nsr", choices=("grpo", "nsr")),
    Key("lora", "dict|null|bool", None, "null, or {r, lora_alpha, lora_dropout, target_modules, "
        "...} for PEFT LoRA (target_modules default 'all-linear')", check=lora_problem,
        allowed="null or a mapping of LoRA settings (r >= 1, lora_alpha > 0, ...)"),
    Key("dtype", "str", "float32", "policy weights: float32 | bfloat16",
        choices=("float32", "bfloat16")),
    Key("attn_implementation", "str|null", None, "the policy's attention in transformers "
        "(null: sdpa, or eager for a model with softcapped attention logits); "
        "flash_attention_2/3 need a CUDA GPU and their package. Attention-signal credit "
        "runs its own sdpa capture in the loss forward whatever this says; QK credit under "
        "gradient checkpointing refuses eager", choices=ATTN_IMPLEMENTATIONS,
        resume="allowed"),
    Key("resume", "str|bool", "auto", "auto (continue the run in output_dir if it is the same "
        "run) | never (output_dir must be empty; --overwrite clears it) | a checkpoint path",
        check=resume_problem, allowed="auto, never or an existing checkpoint directory",
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
        "trained model", check=reasoning_vector_problem,
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
    Key("rollout_lag", "int", 0, "vllm_server: 1 = the server generates the next batch while "
        "the trainer trains on the current one, which the weights one optimizer step older "
        "generated (trainers/rollout_lag.py); 0 = each batch waits for its generation",
        ge=0, le=1),
    Key("rollout_kv_cache_gib", "float", 0.5, "vLLM KV cache size (GiB)", gt=0, resume="free"),
    Key("rollout_gpu_memory_utilization", "float|null", None, "vLLM GPU memory fraction", gt=0,
        le=1, resume="free"),
    Key("rollout_max_model_len", "int|null", None, "vLLM max sequence length", ge=1,
        resume="free"),
    Key("rollout_enforce_eager", "bool|null", None, "vllm: no CUDA graphs (null: by device, "
        "chosen when the job starts and recorded: true on CPU, false on GPUs)",
        resume="free"),
    Key("rollout_enable_chunked_prefill", "bool|null", None, "vllm: chunked prefill (null: "
        "by device, chosen when the job starts and recorded: false on CPU, where seeded "
        "requests cannot be prefilled in chunks; true on GPUs)", resume="free"),
    Key("log_credit_completions", "int", 2, "completions shown with their per-token "
        "advantages at every logging step (OUTPUT_DIR/credit/step-N.html, W&B table "
        "credit/completions); 0 = off", ge=0, resume="free"),
    Key("metrics_jsonl", "str|null", "metrics.jsonl", "local JSONL of every logged metric, "
        "relative to output_dir (null: off)"),
]

# TRL / transformers fields the shipped configs use, with their ranges. Defaults are TRL's
# except output_dir and logging_steps (attnrl's choice: outputs/default, 1).
TRL_KEYS = [
    Key("output_dir", "str", "outputs/default", "where checkpoints, final/, metrics and "
        "config.yaml go", resume="free"),
    Key("max_steps", "int", -1, "optimizer steps; -1 = num_train_epochs over the prompts",
        check=max_steps_problem, allowed="-1 (train num_train_epochs) or an integer >= 1",
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
        "top-p only, so 0 (off)", check=engine_default(0),
        allowed="0"),
    Key("min_p", "float|null", None, "min-p sampling: not applied by attnrl's engines (null)",
        check=engine_default(None), allowed="null"),
    Key("repetition_penalty", "float", 1.0, "repetition penalty: not applied by attnrl's "
        "engines (1.0)", check=engine_default(1.0),
        allowed="1.0"),
    Key("generation_kwargs", "dict|null", None, "extra sampling arguments: not used by "
        "attnrl's engines (null)", check=engine_default(None),
        allowed="null"),
    Key("beta", "float", 0.0, "KL coefficient", ge=0),
    Key("epsilon", "float", 0.2, "PPO clip range", gt=0),
    Key("num_iterations", "int", 1, "optimisation passes over each generated batch", ge=1),
    Key("loss_type", "str", "dapo", "TRL loss aggregation", choices=LOSS_TYPES),
    Key("vllm_importance_sampling_mode", "str|null", None, "how TRL's importance-sampling "
        f"correction weighs the sampler / trainer mismatch (null: {LONG_IS_MODE} when "
        f"max_completion_length > {LONG_COMPLETION}, loss_type vespo or rollout_lag 1, "
        "else TRL's "
        "sequence_mask; the resolved mode is recorded; trainers/schema_engine.py says why)",
        choices=IS_MODES),
    Key("scale_rewards", "str|bool", "group", "reward std scaling",
        choices=("group", "batch", "none")),
    Key("entropy_coef", "float", 0.0, "entropy bonus", ge=0),
    Key("multi_objective_aggregation", "str", "sum_then_normalize", "how rewards combine: "
        "attnrl's estimators take their weighted sum", check=reward_aggregation_problem,
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
        check=report_to_problem, allowed="none, all, or a list of " + ", ".join(REPORT_TO[2:]),
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

ATTNRL_DEFAULT_TRL = {"output_dir", "logging_steps", "vllm_importance_sampling_mode"}
"""TRL fields whose default here is attnrl's, not TRL's (always passed to the trainer, as
resolved)."""
MACHINE_DEFAULT_TRL = {"use_cpu", "bf16"}
"""TRL fields whose default (null) is chosen from the machine when a job starts
(trainers/machine.py), not TRL's."""


def _generic_key(name: str) -> Key:
    kinds, default, choices = TRL_FIELDS[name]
    return Key(name, kinds, default, "TRL GRPOConfig field", choices=tuple(choices or ()),
               resume="free" if name in FREE_TRL_FIELDS else "fixed")


KEYS: dict[str, Key] = {k.name: k for k in JOB_KEYS + ATTNRL_KEYS + TRL_KEYS + TRL_ENGINE_KEYS}
KEYS.update({name: _generic_key(name) for name in TRL_FIELDS if name not in KEYS})
JOB_KEY_NAMES = tuple(k.name for k in JOB_KEYS)
DECLARED = tuple(k.name for k in JOB_KEYS + ATTNRL_KEYS + TRL_KEYS)


def default(name: str, trainer: str = "grpo"):
    if trainer == "nsr" and name in NSR_DEFAULTS:
        return NSR_DEFAULTS[name]
    return KEYS[name].default

