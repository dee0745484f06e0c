"""TRL's fields for generation backends and model loading, as attnrl reads them: each one
works (it is passed on, or mapped onto attnrl's key) or is refused in one line naming what
to write instead. attnrl generates with its own rollout engine (rollout_engine) and loads
the policy itself, so TRL's own vLLM, its transformers generation and its model-loading
arguments would otherwise be dropped silently, or start a second engine.

    mapped    vllm_gpu_memory_utilization -> rollout_gpu_memory_utilization,
              vllm_max_model_length -> rollout_max_model_len,
              vllm_server_timeout -> rollout_server_timeout (map_trl_keys)
    used      vllm_tensor_parallel_size, vllm_enable_sleep_mode, vllm_importance_sampling_*
    refused   any value but TRL's default of the others (use_vllm true, vllm_mode server,
              model_init_kwargs, ...)

Also the default importance-sampling mode by completion length (default_is_mode).
"""

from __future__ import annotations

from trainers.schema_key import Key
from trainers.trl_fields import TRL_FIELDS

TRL_TO_ATTNRL = {"vllm_gpu_memory_utilization": "rollout_gpu_memory_utilization",
                 "vllm_max_model_length": "rollout_max_model_len",
                 "vllm_server_timeout": "rollout_server_timeout"}
"""TRL's names of settings attnrl's engine has under its own name: a config may use either
(not both with different values); the checked config holds attnrl's."""

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LONG_COMPLETION = 1024
"""[D] Completions longer than this get a token-level importance-sampling mode by default.
A sequence-level ratio is the product of the per-token ratios: a systematic per-token
log-prob gap g (1.1e-3 measured between a bf16 vLLM server and a float32 trainer) reaches
TRL's clip_max 3 (ln 3 = 1.10) at about 1.10 / g = 1000 tokens, so sequence_mask would drop
(sequence_truncate clip) the long completions for a numerical mismatch alone. 1024 is the
longest completion that cannot reach it at g = 1e-3 (1024 x 1e-3 = 1.02 < 1.10)."""
LONG_IS_MODE = "token_truncate"
"""[D] The token-level mode chosen for long completions: truncated importance sampling per
token (each token's ratio clipped at clip_max), which bounds every weight and keeps every
token's gradient; token_mask would zero a token whose ratio passes the clip (a sampler /
trainer disagreement) instead of down-weighting it. It is the mode TRL documents as the
token-level default."""


def default_is_mode(max_completion_length, loss_type, rollout_lag=0) -> str:
    """vllm_importance_sampling_mode when the config leaves it null: LONG_IS_MODE for
    completions longer than LONG_COMPLETION tokens, for the vespo loss (which needs a
    token-level mode) and for rollout_lag 1 (trainers/rollout_lag.py), else TRL's default,
    sequence_mask."""
    if loss_type == "vespo" or rollout_lag or (max_completion_length or 0) > LONG_COMPLETION:
        return LONG_IS_MODE
    return "sequence_mask"


def _shown(value) -> str:
    """A value as a config would write it: true, null, 'text', 0.5."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _refuse_unless(name: str, instead: str):
    """check= of a TRL field attnrl does not apply: only TRL's default passes; any other
    value is refused with `instead` (what to write)."""
    neutral = TRL_FIELDS[name][1]

    def check(value) -> str | None:
        if value == neutral:
            return None
        return f"{name} {_shown(value)} {instead}"
    return check


def _trl_key(name: str, doc: str, instead: str | None = None, resume: str = "fixed",
             **extra) -> Key:
    """A TRL field with TRL's kinds and default; refused unless at that default when
    `instead` says what to do."""
    kinds, default, choices = TRL_FIELDS[name]
    if instead is not None:
        extra.update(check=_refuse_unless(name, instead), allowed=_shown(default))
    return Key(name, kinds, default, doc, choices=tuple(choices or ()), resume=resume,
               **extra)


_SERVER = ("attnrl's server engine is launch/vllm_server.sh, not `trl vllm-serve`: set "
           "rollout_engine: vllm_server and rollout_server_url")
_TRANSFORMERS_GENERATION = ("is TRL's transformers generation, which attnrl never runs: "
                            "rollout_engine: hf generates with transformers")
_TRANSFORMERS_DOC = ("TRL's transformers generation, which attnrl never runs (rollout_engine: "
                     "hf generates with transformers)")

TRL_ENGINE_KEYS = [
    _trl_key("use_vllm", "TRL's own vLLM engine: never started (attnrl generates with "
             "rollout_engine); only false", "would start TRL's own vLLM engine beside "
             "attnrl's, which generates every rollout: remove use_vllm (rollout_engine: "
             "vllm is attnrl's in-process vLLM)"),
    _trl_key("vllm_mode", "only colocate (attnrl's in-process engine runs beside training)",
             f"is TRL's server mode; {_SERVER}"),
    _trl_key("vllm_model_impl", "only vllm (vLLM's own model implementation)",
             "is not applied: attnrl's engine runs vLLM's own model implementation; remove "
             "vllm_model_impl"),
    _trl_key("vllm_structured_outputs_regex", "only null: attnrl's engines do not constrain "
             "generation", "is not applied: attnrl's engines do not constrain generation; "
             "remove it"),
    _trl_key("vllm_server_base_url", "only null: " + _SERVER, f"is TRL's server; {_SERVER}"),
    _trl_key("vllm_server_host", "only its default: " + _SERVER, f"is TRL's server; {_SERVER}"),
    _trl_key("vllm_server_port", "only its default: " + _SERVER, f"is TRL's server; {_SERVER}"),
    _trl_key("vllm_group_port", "only its default: " + _SERVER, f"is TRL's server; {_SERVER}"),
    _trl_key("vllm_server_timeout", "TRL's name of rollout_server_timeout (mapped onto it)",
             resume="free"),
    _trl_key("vllm_gpu_memory_utilization", "TRL's name of rollout_gpu_memory_utilization "
             "(mapped onto it; TRL's default 0.3 is not used)", resume="free"),
    _trl_key("vllm_max_model_length", "TRL's name of rollout_max_model_len (mapped onto it)",
             resume="free"),
    _trl_key("vllm_tensor_parallel_size", "ranks sharing one in-process vLLM engine (several "
             "processes: consecutive ranks, each engine on its rank's device)", ge=1,
             resume="allowed"),
    _trl_key("vllm_enable_sleep_mode", "rollout_engine vllm on GPUs: the engine sleeps "
             "(weights offloaded to CPU memory, KV cache freed) from the end of each "
             "generation until the next, so the optimizer step has its memory; refused on "
             "CPU (vLLM has no sleep mode there); untested on GPUs", resume="free"),
    _trl_key("model_init_kwargs", "only null: attnrl loads the policy itself (TRL would "
             "ignore these for it yet build its reference model with them)",
             "is not applied: attnrl loads the policy itself; set dtype and "
             "attn_implementation instead"),
    _trl_key("trust_remote_code", "only false: attnrl loads transformers' own architectures",
             "is not applied: attnrl loads models without remote code (transformers' own "
             "architectures); remove it"),
    _trl_key("ds3_gather_for_generation", "only true: attnrl's engine sync gathers ZeRO-3 "
             "weights bucket by bucket (trainers/weight_sync.py)",
             "is not applied: attnrl's engine sync gathers ZeRO-3 weights bucket by bucket "
             "(trainers/weight_sync.py); remove it"),
    _trl_key("cache_implementation", "only null: " + _TRANSFORMERS_DOC,
             _TRANSFORMERS_GENERATION),
    _trl_key("use_transformers_paged", "only false: " + _TRANSFORMERS_DOC,
             _TRANSFORMERS_GENERATION),
    _trl_key("use_transformers_continuous_batching", "only false: " + _TRANSFORMERS_DOC,
             _TRANSFORMERS_GENERATION),
    _trl_key("transformers_continuous_batching_config", "only null: " +
             _TRANSFORMERS_DOC, _TRANSFORMERS_GENERATION),
    _trl_key("chat_template_kwargs", "only null: attnrl formats the prompts itself "
             "(instruction, system_prompt)", "is not applied: attnrl formats the prompts "
             "itself (keys instruction and system_prompt); remove it"),
]


def map_trl_keys(checked: dict, sources: dict, source: str, check) -> dict:
    """The checked config with TRL's names of attnrl's engine settings (TRL_TO_ATTNRL)
    replaced by attnrl's; `check(name, value, where)` checks a value against attnrl's key.
    UserError when both names are given with different values."""
    from attnrl.errors import UserError

    out = dict(checked)
    for trl, ours in TRL_TO_ATTNRL.items():
        if trl not in out:
            continue
        value, where = out.pop(trl), sources.get(trl, source)
        if ours in out and out[ours] != value:
            raise UserError(f"{where}: {trl} {value} is TRL's name of attnrl's {ours}, given "
                            f"as {out[ours]} ({sources.get(ours, source)}); keep one of them")
        try:
            out[ours] = check(ours, value, where)
        except UserError as err:
            raise UserError(f"{err} (given as {trl}, TRL's name of {ours})") from None
        sources[ours] = where
    return out


def engine_key_problems(args) -> list[str]:
    """What a built trainer config (`args`, attribute access) sets that TRL_ENGINE_KEYS
    refuse: the same one-line texts the config check gives."""
    problems = []
    for key in TRL_ENGINE_KEYS:
        value = getattr(args, key.name, None)
        if key.check is not None and value is not None:
            problem = key.check(value)
            if problem:
                problems.append(problem)
    return problems
