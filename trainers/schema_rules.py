"""Rules between keys, checked once every value has passed its own key: top_p against
TRL's importance-sampling correction, use_liger_kernel, the rollout server's URL, the
held-out settings, batch sizes that divide, the FAI window, and what the model must allow
(layers in range, attention the capture can read, LoRA off tied embeddings), a data file's
field mapping. Each rule
raises UserError naming the keys and where their values came from (`where`).
"""

from __future__ import annotations

import os

from attnrl.cli_checks import SMOLLM2_NAMES, layer_count, layers_problem
from attnrl.credit_names import ATTENTION_CREDIT
from attnrl.errors import UserError
from trainers.schema_declarations import default


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


def check_together(config: dict, where) -> None:
    """Every rule between keys of a checked config (absent keys: their defaults);
    `where(*names)` says where the values of those keys came from."""
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
    check_binary_outcomes(trainer, get, where)
    check_context(config, get, where)
    check_engine_keys(get, where)
    check_attn_implementation(config, get, where)
    check_attention(config, get, where)
    check_lora_tied(config, get, where)
    check_fields(get, where)
    rewards = get("rewards") or {}
    for name in (get("reward_options") or {}):
        if name not in rewards:
            raise UserError(f"{where('reward_options', 'rewards')}: reward_options names "
                            f"{name!r}, which is not in rewards ({', '.join(rewards)})")


def check_binary_outcomes(trainer: str, get, where) -> None:
    """trainer nsr takes only the binary-outcome estimators; those, without
    correctness_threshold, need a reward that is exactly 0 or 1: one reward of
    BINARY_REWARDS (or a plug-in, checked on every batch) with weight 1. Both before any
    model loads (the trainer would otherwise stop at its first batch)."""
    from trainers.schema_names import BINARY_REWARDS, NSR_ESTIMATORS

    estimator = get("advantage_estimator")
    if trainer == "nsr" and estimator not in NSR_ESTIMATORS:
        raise UserError(f"{where('trainer', 'advantage_estimator')}: trainer nsr needs "
                        f"advantage_estimator one of {', '.join(NSR_ESTIMATORS)}, got "
                        f"{estimator!r}; for grpo / dr_grpo / rloo use trainer: grpo")
    if estimator not in NSR_ESTIMATORS or get("correctness_threshold") is not None:
        return
    from rewards.plugins import is_plugin

    mix = {name: weight for name, weight in (get("rewards") or {}).items() if weight}
    name, weight = next(iter(mix.items())) if len(mix) == 1 else (None, None)
    if weight == 1 and (name in BINARY_REWARDS or is_plugin(name)):
        return
    shown = ", ".join(f"{k}: {v:g}" for k, v in mix.items())
    if len(mix) != 1:
        why = "several rewards add up" if mix else "no reward"
    else:
        why = f"weight {weight:g}" if name in BINARY_REWARDS else f"{name} is not 0/1"
    raise UserError(f"{where('rewards', 'advantage_estimator', 'correctness_threshold')}: "
                    f"advantage_estimator {estimator} needs binary rewards (1 correct, 0 "
                    f"incorrect), but the mix {{{shown}}} can score other values ({why}); set "
                    "correctness_threshold T (rewards >= T count as correct) or use one 0/1 "
                    "reward with weight 1")


def check_context(config: dict, get, where) -> None:
    """Prompt and completion fit the model's context (max_position_embeddings, read from
    its config.json): vLLM would refuse the engine after the model loaded."""
    from attnrl.cli_checks import context_length

    model = config.get("model", "smollm2")
    context = context_length(model)
    if context is None:
        return
    completion, prompt = get("max_completion_length"), get("max_prompt_length")
    engine_len = get("rollout_max_model_len")
    if completion is not None and completion >= context:
        raise UserError(f"{where('max_completion_length', 'model')}: max_completion_length "
                        f"{completion} leaves no room for a prompt in {model}'s context of "
                        f"{context} tokens (max_position_embeddings); set it below {context}")
    if prompt is not None and completion is not None and prompt + completion > context:
        raise UserError(f"{where('max_prompt_length', 'max_completion_length', 'model')}: "
                        f"max_prompt_length {prompt} + max_completion_length {completion} = "
                        f"{prompt + completion} tokens exceed {model}'s context of {context}")
    if engine_len is not None and engine_len > context:
        raise UserError(f"{where('rollout_max_model_len', 'model')}: rollout_max_model_len "
                        f"{engine_len} exceeds {model}'s context of {context} tokens; set it "
                        f"to at most {context} (or leave it null)")


def check_engine_keys(get, where) -> None:
    """vllm_enable_sleep_mode only with attnrl's in-process vLLM engine (the device is
    checked when the job starts: trainers/machine.py); rollout_lag 1 only where it can run
    (trainers/rollout_lag.py)."""
    from trainers.rollout_lag import lag_problem

    problem = lag_problem(get("rollout_lag"), get("rollout_engine"),
                          get("vllm_importance_sampling_correction"),
                          get("vllm_importance_sampling_mode"))
    if problem:
        names = ("rollout_lag", "rollout_engine", "vllm_importance_sampling_mode")
        raise UserError(f"{where(*names)}: {problem}")
    if get("vllm_enable_sleep_mode") and get("rollout_engine") != "vllm":
        raise UserError(f"{where('vllm_enable_sleep_mode', 'rollout_engine')}: "
                        f"vllm_enable_sleep_mode true needs rollout_engine vllm (attnrl's "
                        f"in-process engine), not {get('rollout_engine')}; remove it")


def check_attn_implementation(config: dict, get, where) -> None:
    """attn_implementation where the model and the credit can run on it: a model with
    softcapped attention logits needs one that applies the softcap; QK credit under
    gradient checkpointing needs one in transformers' attention registry (its capture
    delegates to it; eager is not there, so the recompute would run another attention)."""
    from attnrl.attention_config import SOFTCAPPING, attention_softcap, read_config

    implementation = get("attn_implementation")
    if implementation is None:
        return
    model = config.get("model", "smollm2")
    model_config = read_config(model)
    softcap = attention_softcap(model_config) if model_config else None
    if softcap and implementation not in SOFTCAPPING:
        raise UserError(f"{where('attn_implementation', 'model')}: attn_implementation "
                        f"{implementation} ignores the attention-logit softcap of {model} "
                        f"(attn_logit_softcapping={softcap:g}); use one of "
                        f"{', '.join(SOFTCAPPING)}, or null")
    reads = {ATTENTION_CREDIT[p.strip()] for p in str(get("credit")).split("+")
             if p.strip() in ATTENTION_CREDIT}
    if implementation == "eager" and "qk" in reads and get("gradient_checkpointing"):
        raise UserError(f"{where('attn_implementation', 'credit', 'gradient_checkpointing')}"
                        f": attn_implementation eager with QK credit {get('credit')} under "
                        "gradient checkpointing: the QK capture runs sdpa but the recompute "
                        "would run eager; use sdpa (or a flash / flex attention), or "
                        "gradient_checkpointing: false")


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
    if lora.get("use_dora"):  # trainers/lora_merge.py: plain LoRA only
        raise UserError(f"{where('lora')}: lora.use_dora true cannot be synced to the rollout "
                        "engine: attnrl's weight sync merges plain LoRA (W + (alpha / r) B A) "
                        "and not DoRA's column-norm rescaling; use lora: {use_dora: false}")
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


def check_fields(get, where) -> None:
    """question_field / answer_field: two different fields, set only for a job that reads a
    data file of its own (task or eval_task; not the bundled gsm8k, whose fields are fixed)."""
    from attnrl.data import file_options

    fields = {name: get(name) for name in ("question_field", "answer_field")}
    if fields["question_field"] == fields["answer_field"]:
        raise UserError(f"{where('question_field', 'answer_field')}: question_field and "
                        f"answer_field are both {fields['question_field']!r}; the question and "
                        "the answer are two fields")
    changed = [n for n, v in fields.items() if v != default(n)]
    tasks = [t for t in (get("task"), get("eval_task")) if t is not None]
    if changed and not any(file_options(fields, str(t)) for t in tasks):
        raise UserError(f"{where(*changed, 'task')}: {changed[0]} {get(changed[0])!r} is "
                        f"set, but task {get('task')!r} is no data file of yours (a reasoning-"
                        "gym task or the bundled gsm8k, whose fields are fixed); remove "
                        f"{changed[0]} or give a data file as task / eval_task")
