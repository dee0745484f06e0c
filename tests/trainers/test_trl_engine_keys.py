"""TRL's generation-backend and model-loading fields either work or are refused in one line
(trainers/schema_engine.py): mapped ones reach attnrl's engine, refused ones exit before
anything loads; the importance-sampling mode by completion length; the in-process vLLM
engine's settings by device (attnrl/rollout/engine_settings.py, trainers/machine.py) and
its sleep mode."""

import json
import types

import pytest

from attnrl.errors import UserError
from trainers import machine
from trainers.job import load_config
from trainers.schema import KEYS, TRL_ENGINE_KEYS, TRL_FIELDS, TRL_TO_ATTNRL, resolve

BACKEND_FIELDS = {"use_vllm", "model_init_kwargs", "trust_remote_code",
                  "ds3_gather_for_generation", "cache_implementation", "use_transformers_paged",
                  "use_transformers_continuous_batching",
                  "transformers_continuous_batching_config", "chat_template_kwargs"}
PASSED_IS_FIELDS = {"vllm_importance_sampling_correction", "vllm_importance_sampling_clip_max",
                    "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap",
                    "vllm_importance_sampling_mode"}
REFUSED = [  # (key, a value other than TRL's default, what the one line must say)
    ("use_vllm", True, "use_vllm true would start TRL's own vLLM engine"),
    ("vllm_mode", "server", "set rollout_engine: vllm_server and rollout_server_url"),
    ("vllm_model_impl", "transformers", "vLLM's own model implementation"),
    ("vllm_structured_outputs_regex", "[0-9]+", "do not constrain generation"),
    ("vllm_server_base_url", "http://h:8000", "rollout_server_url"),
    ("vllm_server_host", "127.0.0.1", "rollout_server_url"),
    ("vllm_server_port", 9000, "rollout_server_url"),
    ("vllm_group_port", 5000, "rollout_server_url"),
    ("model_init_kwargs", {"attn_implementation": "flash_attention_2"},
     "set dtype and attn_implementation instead"),
    ("trust_remote_code", True, "without remote code"),
    ("ds3_gather_for_generation", False, "bucket by bucket"),
    ("cache_implementation", "static", "rollout_engine: hf"),
    ("use_transformers_paged", True, "rollout_engine: hf"),
    ("use_transformers_continuous_batching", True, "rollout_engine: hf"),
    ("transformers_continuous_batching_config", {"max_batch_tokens": 64}, "rollout_engine: hf"),
    ("chat_template_kwargs", {"enable_thinking": False}, "instruction and system_prompt"),
]


def test_every_trl_backend_field_is_mapped_used_or_refused():
    """Every TRL field named vllm_* or about generation backends / model loading has a
    declaration saying what attnrl does with it (none is left a silently passed generic)."""
    wanted = {n for n in TRL_FIELDS if n.startswith("vllm_")} | BACKEND_FIELDS
    engine = {k.name for k in TRL_ENGINE_KEYS}
    assert wanted - PASSED_IS_FIELDS <= engine
    refused = {k.name for k in TRL_ENGINE_KEYS if k.check is not None}
    assert refused == {name for name, _, _ in REFUSED}


@pytest.mark.parametrize("name, value, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_values_are_one_line_naming_what_to_write(name, value, message):
    with pytest.raises(UserError) as err:
        load_config(None, {name: value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"command line: {name} ") and message in text
    load_config(None, {name: TRL_FIELDS[name][1]})  # TRL's default is accepted


def test_trl_names_map_onto_attnrl_keys_and_are_recorded_as_those():
    given = {"vllm_gpu_memory_utilization": 0.5, "vllm_max_model_length": 4096,
             "vllm_server_timeout": 30}
    config = load_config(None, given)
    for trl, ours in TRL_TO_ATTNRL.items():
        assert trl not in config and config[ours] == given[trl]
        assert trl not in resolve(config)
    same = load_config(None, {"vllm_gpu_memory_utilization": 0.5,
                              "rollout_gpu_memory_utilization": 0.5})
    assert same["rollout_gpu_memory_utilization"] == 0.5
    with pytest.raises(UserError, match="vllm_gpu_memory_utilization 0.5 is TRL's name of "
                                        "attnrl's rollout_gpu_memory_utilization, given as 0.3"):
        load_config(None, {"vllm_gpu_memory_utilization": 0.5,
                           "rollout_gpu_memory_utilization": 0.3})
    with pytest.raises(UserError, match=r"out of range.*\(given as vllm_gpu_memory_utilization"):
        load_config(None, {"vllm_gpu_memory_utilization": 1.5})


def _trainer_config(config: dict):
    """The trainer config `attnrl train` builds from a checked config on this CPU machine."""
    from trainers.grpo import AttnGRPOConfig
    from trainers.schema import ATTNRL_DEFAULT_TRL, JOB_KEY_NAMES

    chosen = machine.choose(config)[0]
    resolved = {**resolve(config), **chosen}
    chosen.update(machine.engine_choices(resolved))
    kwargs = {k: v for k, v in {**config, **chosen}.items() if k not in JOB_KEY_NAMES}
    for name in ATTNRL_DEFAULT_TRL:
        kwargs.setdefault(name, resolved[name])
    kwargs.update(output_dir="unused", report_to="none")
    return AttnGRPOConfig(**kwargs)


def _engine_kwargs(args, monkeypatch) -> dict:
    """What AttnGRPOTrainer._make_engine hands make_engine for `args`."""
    from trainers import grpo

    made = {}
    monkeypatch.setattr(grpo, "make_engine", lambda kind, path, **kw: made.update(kind=kind, **kw))
    fake = types.SimpleNamespace(args=args, model=types.SimpleNamespace(
        config=types.SimpleNamespace(_name_or_path="m")),
        accelerator=types.SimpleNamespace(num_processes=1))
    grpo.AttnGRPOTrainer._make_engine(fake)
    return made


def test_trl_memory_and_length_reach_attnrl_engine(monkeypatch):
    """--vllm_gpu_memory_utilization 0.5 is the engine's memory (before: dropped, and the
    engine fell back to a 0.5 GiB KV cache); vllm_max_model_length its length."""
    args = _trainer_config(load_config(None, {"vllm_gpu_memory_utilization": 0.5,
                                              "vllm_max_model_length": 3000}))
    made = _engine_kwargs(args, monkeypatch)
    assert made["kind"] == "vllm" and made["gpu_memory_utilization"] == 0.5
    assert made["max_model_len"] == 3000
    assert not args.use_vllm  # TRL's own engine never starts
    # this CPU machine: today's engine settings, recorded (chosen when the job starts)
    assert made["enforce_eager"] is True and made["enable_chunked_prefill"] is False
    assert made["enable_sleep_mode"] is False


def test_a_built_trainer_config_refuses_trl_engine_values():
    from trainers.grpo import AttnGRPOConfig

    with pytest.raises(UserError, match="use_vllm true would start TRL's own vLLM engine"):
        AttnGRPOConfig(output_dir="unused", use_cpu=True, use_vllm=True)


@pytest.mark.parametrize("given, mode", [
    ({}, "sequence_mask"),                                   # configs/default.yaml: 64 tokens
    ({"max_completion_length": 1024}, "sequence_mask"),
    ({"max_completion_length": 1025}, "token_truncate"),
    ({"max_completion_length": 8000}, "token_truncate"),   # SmolLM2's context: 8192
    ({"loss_type": "vespo"}, "token_truncate"),              # vespo needs a token-level mode
    ({"max_completion_length": 8000, "vllm_importance_sampling_mode": "sequence_mask"},
     "sequence_mask"),                                       # given: kept
])
def test_importance_sampling_mode_by_completion_length(given, mode):
    resolved = resolve(load_config(None, given))
    assert resolved["vllm_importance_sampling_mode"] == mode  # recorded in config.yaml
    assert _trainer_config(load_config(None, given)).vllm_importance_sampling_mode == mode


def test_trainer_config_built_directly_resolves_the_mode_too():
    from trainers.grpo import AttnGRPOConfig

    args = AttnGRPOConfig(output_dir="unused", use_cpu=True, max_completion_length=4096)
    assert args.vllm_importance_sampling_mode == "token_truncate"


# ---------------------------------------------------------------- engine settings by device
CPU = {"cuda": 0, "bf16": False}


def test_engine_settings_by_device_are_chosen_and_overridable():
    assert machine.engine_choices({"use_cpu": True}) == {
        "rollout_enforce_eager": True, "rollout_enable_chunked_prefill": False}
    assert machine.engine_choices({"use_cpu": False}) == {
        "rollout_enforce_eager": False, "rollout_enable_chunked_prefill": True}
    assert machine.engine_choices({"use_cpu": False, "rollout_enforce_eager": True}) == {
        "rollout_enable_chunked_prefill": True}


def test_cpu_engine_arguments_are_todays():
    from attnrl.rollout.engine_settings import batching_kwargs

    assert batching_kwargs(2048, cuda=False) == {
        "enforce_eager": True, "enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert batching_kwargs(9216, cuda=False)["max_num_batched_tokens"] == 9216
    assert batching_kwargs(2048, cuda=True) == {"enforce_eager": False,
                                                "enable_chunked_prefill": True}
    assert batching_kwargs(2048, cuda=True, enforce_eager=True,
                           enable_chunked_prefill=False)["max_num_batched_tokens"] == 8192


def test_vllm_engine_is_built_with_the_settings(monkeypatch, tiny_model_dir):
    """VLLMEngine's LLM(...) arguments on this CPU: today's values when nothing is set, the
    given ones otherwise (vLLM itself replaced: only the plumbing is checked)."""
    import vllm

    from attnrl.rollout.vllm_engine import VLLMEngine

    built = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: built.append(kw) or types.SimpleNamespace())
    VLLMEngine(tiny_model_dir, max_model_len=512)
    assert built[-1]["enforce_eager"] is True and built[-1]["enable_chunked_prefill"] is False
    assert built[-1]["max_num_batched_tokens"] == 8192 and "enable_sleep_mode" not in built[-1]
    VLLMEngine(tiny_model_dir, max_model_len=512, enforce_eager=False,
               enable_chunked_prefill=True, enable_sleep_mode=True)
    assert built[-1]["enforce_eager"] is False and built[-1]["enable_chunked_prefill"] is True
    assert "max_num_batched_tokens" not in built[-1] and built[-1]["enable_sleep_mode"] is True


class _FakeLLM:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **kw: self.calls.append(name)


def test_sleep_mode_sleeps_after_generation_and_wakes_before_use():
    from attnrl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.asleep, engine.engine_kwargs = _FakeLLM(), False, {}
    engine.sleep()  # built without sleep mode: nothing
    assert engine.llm.calls == [] and not engine.asleep
    engine.engine_kwargs = {"enable_sleep_mode": True}
    engine.sleep()
    engine.sleep()
    assert engine.llm.calls == ["sleep"] and engine.asleep
    engine.update_weights({})
    assert engine.llm.calls == ["sleep", "wake_up", "reset_prefix_cache", "collective_rpc",
                                "reset_prefix_cache"] and not engine.asleep


@pytest.mark.parametrize("config, message", [
    ({"use_cpu": True, "vllm_enable_sleep_mode": True}, "runs on CPU, where vLLM has no sleep"),
    ({"use_cpu": True, "attn_implementation": "flash_attention_2"}, "runs on CPU; use sdpa"),
    ({"use_cpu": False, "attn_implementation": "flash_attention_2"},
     "needs the flash_attn package"),
])
def test_keys_that_need_a_gpu_are_refused_on_cpu(config, message):
    with pytest.raises(UserError, match=message):
        machine.check_device_keys(config)


def test_sleep_mode_needs_attnrl_in_process_engine():
    with pytest.raises(UserError, match="vllm_enable_sleep_mode true needs rollout_engine vllm"):
        load_config(None, {"vllm_enable_sleep_mode": True, "rollout_engine": "hf"})
    assert load_config(None, {"vllm_enable_sleep_mode": True})["vllm_enable_sleep_mode"]


# ---------------------------------------------------------------- attn_implementation
def test_attn_implementation_is_a_key_refused_where_it_cannot_run(tmp_path):
    assert KEYS["attn_implementation"].default is None
    assert load_config(None, {"attn_implementation": "eager"})["attn_implementation"] == "eager"
    with pytest.raises(UserError, match="unknown attn_implementation 'flash_attention2' "
                                        r"\(did you mean 'flash_attention_2'\?\)"):
        load_config(None, {"attn_implementation": "flash_attention2"})
    with pytest.raises(UserError, match="attn_implementation eager with QK credit qk_tokens "
                                        "under gradient checkpointing"):
        load_config(None, {"attn_implementation": "eager", "credit": "qk_tokens",
                           "gradient_checkpointing": True})
    load_config(None, {"attn_implementation": "eager", "credit": "qk_tokens",
                       "gradient_checkpointing": False})  # the default config's
    softcapped = tmp_path / "gemma2"
    softcapped.mkdir()
    (softcapped / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "attn_logit_softcapping": 50.0}))
    with pytest.raises(UserError, match="attn_implementation sdpa ignores the attention-logit "
                                        "softcap"):
        load_config(None, {"model": str(softcapped), "attn_implementation": "sdpa"})
