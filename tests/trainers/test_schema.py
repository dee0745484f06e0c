"""The light config schema (trainers/schema.py) agrees with what it describes: TRL's
GRPOConfig (trainers/trl_fields.py), AttnGRPOConfig / NSRConfig fields and defaults, and the
registries of credit strategies, estimators and rewards; values are parsed and checked as
documented."""

import dataclasses
import subprocess
import sys

import pytest

from attnrl import cli_checks
from attnrl.errors import UserError
from trainers import schema
from trainers.job import load_config, parse_overrides
from trainers.schema import KEYS, check_config, resolve


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def test_trl_fields_table_matches_installed_trl():
    from trl import GRPOConfig

    from trainers.schema_sync import describe_fields
    from trainers.trl_fields import TRL_FIELDS

    assert describe_fields(GRPOConfig) == TRL_FIELDS, \
        "TRL changed: regenerate with `python -m trainers.schema_sync > trainers/trl_fields.py`"


def test_every_trainer_field_is_declared_with_its_default():
    from trainers.grpo import AttnGRPOConfig
    from trainers.nsr import NSRConfig

    fields = {f.name: f for f in dataclasses.fields(AttnGRPOConfig)}
    assert set(fields) <= set(KEYS)
    attnrl_fields = set(fields) - set(schema.TRL_FIELDS)
    declared = {k.name for k in schema.ATTNRL_KEYS}
    assert attnrl_fields == declared, "declare AttnGRPOConfig's fields in ATTNRL_KEYS"
    for name, f in fields.items():
        if name in schema.ATTNRL_DEFAULT_TRL:
            continue
        if name in schema.MACHINE_DEFAULT_TRL:  # chosen from the machine (trainers/machine.py)
            assert KEYS[name].default is None, name
            continue
        assert KEYS[name].default == _default(f), name
    for f in dataclasses.fields(NSRConfig):
        assert schema.default(f.name, "nsr") == _default(f) or \
            f.name in schema.ATTNRL_DEFAULT_TRL or f.name in schema.MACHINE_DEFAULT_TRL, f.name
    assert not set(schema.JOB_KEY_NAMES) & set(fields)


def test_registries_match_the_heavy_modules():
    from peft import LoraConfig

    from attnrl.advantages import ESTIMATORS
    from attnrl.credit import CREDIT_STRATEGIES
    from attnrl.models import SMOLLM2_NAMES, resolve_model
    from rewards import REWARDS

    assert set(schema.CREDIT_STRATEGIES) == set(CREDIT_STRATEGIES)
    assert set(schema.SIGNED_CREDIT) == {n for n, s in CREDIT_STRATEGIES.items() if s.signed}
    assert set(schema.ESTIMATORS) == set(ESTIMATORS)
    assert set(schema.REWARDS) == set(REWARDS)
    assert schema.SMOLLM2_NAMES == SMOLLM2_NAMES
    assert set(schema.LORA_KEYS) <= {f.name for f in dataclasses.fields(LoraConfig)}
    import json

    config = json.loads((resolve_model("smollm2") / "config.json").read_text())
    assert config["num_hidden_layers"] == cli_checks.SMOLLM2_LAYERS


def test_checking_a_config_imports_nothing_heavy():
    code = ("import sys; from trainers.job import load_config, parse_overrides\n"
            "load_config(None, parse_overrides(['--max_steps', '3']))\n"
            "heavy = [m for m in ('torch', 'trl', 'vllm', 'transformers', 'deepspeed') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr


def test_values_are_read_as_the_key_takes_them():
    checked = check_config({"learning_rate": "1e-5", "max_steps": 3.0, "run_name": 7,
                            "scale_rewards": False, "report_to": ["wandb"], "lora": {"r": 8}})
    assert checked["learning_rate"] == 1e-5 and isinstance(checked["max_steps"], int)
    assert checked["run_name"] == "7" and checked["scale_rewards"] is False
    with pytest.raises(UserError, match=r"max_steps = 2.5 is not an integer"):
        check_config({"max_steps": 2.5})
    with pytest.raises(UserError, match="bf16 = 'yes' is a string, not true or false"):
        check_config({"bf16": "yes"})
    with pytest.raises(UserError, match=r"report_to: unknown reporter|names unknown reporter "
                                        r"'wandbb' \(did you mean 'wandb'\?\)"):
        check_config({"report_to": ["wandbb"]})
    with pytest.raises(UserError, match="set generation_batch_size or steps_per_generation"):
        check_config({"generation_batch_size": 16, "steps_per_generation": 2})
    with pytest.raises(UserError, match="signal_h_hi 5 < signal_h_lo 10"):
        check_config({"signal_h_hi": 5})
    with pytest.raises(UserError, match="reward_options names 'format', which is not in"):
        check_config({"reward_options": {"format": {"pattern": "x"}}})


def test_overrides_keep_text_negative_numbers_and_bare_flags():
    parsed = parse_overrides(["--run_name=my-run", "--tau_waad", "-0.5", "--bf16",
                              "--max-steps", "4"])
    assert parsed == {"run_name": "my-run", "tau_waad": -0.5, "bf16": True, "max_steps": 4}
    assert parsed.bare == {"bf16"}
    assert load_config(None, parsed)["bf16"] is True  # a bare flag is true for a bool key


def test_resolve_fills_every_declared_key_with_the_trainers_defaults():
    grpo = resolve(load_config(None))
    assert set(schema.DECLARED) <= set(grpo)
    assert grpo["qk_top_k"] == 4 and grpo["loss_type"] == "dapo" and grpo["lora"] is None
    nsr = resolve(check_config({"trainer": "nsr"}))
    assert nsr["loss_type"] == "bnpo" and nsr["advantage_estimator"] == "nsr"
    assert nsr["entropy_coef"] == 0.001


def test_every_declared_key_documents_what_it_takes():
    for key in KEYS.values():
        assert key.doc and key.describe(), key.name
        assert key.resume in ("fixed", "allowed", "free"), key.name
        if key.name in schema.DECLARED and key.default is not None:
            schema.coerce(key, key.default)  # every default is allowed by its own key


def test_signed_credit_is_refused_in_composition():
    with pytest.raises(UserError, match="cannot be composed"):
        load_config(None, {"credit": "coupled+sign_flip"})
    assert load_config(None, {"credit": "sign_flip",
                              "credit_flip_fraction": 0.5})["credit_flip_fraction"] == 0.5
    with pytest.raises(UserError, match="credit_flip_fraction"):
        load_config(None, {"credit": "sign_flip", "credit_flip_fraction": 1.5})


def test_top_p_below_one_is_refused_with_the_importance_sampling_correction():
    """The engines' log-probs are of the nucleus (sampling) distribution, TRL's of the full
    softmax: with TRL's IS correction on, each answer's weight would be the product of its
    tokens' nucleus masses. Refused before anything loads; fine with either way out."""
    with pytest.raises(UserError, match="top_p 0.9 with vllm_importance_sampling_correction"
                                        ".*top_p: 1.0.*vllm_importance_sampling_correction: "
                                        "false"):
        load_config(None, {"top_p": 0.9})
    with pytest.raises(UserError, match="top_p"):
        check_config({"top_p": 0.95, "trainer": "nsr"})
    assert check_config({"top_p": 0.9, "vllm_importance_sampling_correction": False})
    assert check_config({"top_p": 1.0})


def test_top_p_refusal_holds_for_the_trainer_config_itself():
    """AttnGRPOConfig (the Python API, and what `attnrl train` builds before the model)."""
    from trainers.grpo import AttnGRPOConfig

    with pytest.raises(UserError, match="top_p 0.9"):
        AttnGRPOConfig(output_dir="unused", top_p=0.9, use_cpu=True, report_to="none")
    with pytest.raises(UserError, match="use_liger_kernel"):
        AttnGRPOConfig(output_dir="unused", use_liger_kernel=True, use_cpu=True,
                       report_to="none")


@pytest.mark.parametrize("config, words", [
    ({"trainer": "nsr", "advantage_estimator": "grpo"},
     "trainer nsr needs advantage_estimator one of nsr, psr, w_reinforce, got 'grpo'"),
    ({"trainer": "nsr", "rewards": {"answer": 1.0, "overlong": 1.0}},
     r"mix \{answer: 1, overlong: 1\} can score other values \(several rewards add up\)"),
    ({"advantage_estimator": "w_reinforce", "rewards": {"answer": 2.0}}, r"\(weight 2\)"),
    ({"advantage_estimator": "psr", "rewards": {"overlong": 1.0}}, "overlong is not 0/1"),
])
def test_binary_outcome_estimators_refuse_rewards_that_are_not_binary(config, words):
    """Refused when the config is read (the trainer would stop at its first batch)."""
    with pytest.raises(UserError, match=words):
        check_config(config)


def test_binary_outcome_estimators_take_a_threshold_or_one_binary_reward():
    assert check_config({"trainer": "nsr", "rewards": {"answer": 1.0, "overlong": 1.0},
                         "correctness_threshold": 1.0})
    assert check_config({"trainer": "nsr", "rewards": {"math": 1.0}})
    assert check_config({"advantage_estimator": "nsr", "rewards": {"my_pkg.scores:exact": 1}})


@pytest.mark.parametrize("config, words", [
    ({"rollout_lag": 1}, "rollout_lag 1 needs rollout_engine vllm_server, not vllm"),
    ({"rollout_lag": 1, "rollout_engine": "vllm_server", "rollout_server_url": "http://h:1",
      "vllm_importance_sampling_mode": "sequence_mask"}, "token-level"),
    ({"rollout_lag": 2}, "rollout_lag"),
])
def test_rollout_lag_is_refused_where_it_cannot_run(config, words):
    with pytest.raises(UserError, match=words):
        check_config(config)


def test_rollout_lag_makes_the_default_importance_sampling_token_level():
    config = {"rollout_lag": 1, "rollout_engine": "vllm_server",
              "rollout_server_url": "http://h:1"}
    assert resolve(check_config(config))["vllm_importance_sampling_mode"] == "token_truncate"
    assert resolve(check_config({}))["vllm_importance_sampling_mode"] == "sequence_mask"


def test_liger_kernel_is_refused_in_one_line():
    """TRL's liger loss never calls the per-token log-prob code where credit is applied."""
    with pytest.raises(UserError) as err:
        load_config(None, {"use_liger_kernel": True})
    assert "use_liger_kernel: false" in str(err.value) and "\n" not in str(err.value)


def test_plugin_rewards_are_checked_for_form_and_resolved_absolute(tmp_path, monkeypatch):
    """A plug-in is written 'module:function' or 'file.py:function'; only its form is checked
    with the config (it is imported when the job starts, trainers/preflight.py); a file's
    path is made absolute from the working directory."""
    monkeypatch.chdir(tmp_path)
    checked = check_config({"rewards": {"my_rewards.py:score": 1.0, "pkg.mod:fn": 0.5,
                                        "answer": 1.0},
                            "reward_options": {"my_rewards.py:score": {"scale": 2}}})
    resolved = resolve(checked)
    spec = f"{tmp_path}/my_rewards.py:score"
    assert resolved["rewards"] == {spec: 1.0, "pkg.mod:fn": 0.5, "answer": 1.0}
    assert resolved["reward_options"] == {spec: {"scale": 2}}
    assert resolved["reward_plugins"] is None  # written by `attnrl train` when it starts
    assert resolve(check_config(resolved))["rewards"] == resolved["rewards"]  # idempotent
    with pytest.raises(UserError, match=r"rewards 'my-mod:fn': 'my-mod' is no module name"):
        check_config({"rewards": {"my-mod:fn": 1.0}})
    with pytest.raises(UserError, match=r"unknown reward 'maths' \(did you mean 'math'\?\).*or "
                                        r"a plug-in 'module:function'"):
        check_config({"rewards": {"maths": 1.0}})
    with pytest.raises(UserError, match=r"reward_options names 'other.py:f', which is not in"):
        check_config({"rewards": {"answer": 1.0}, "reward_options": {"other.py:f": {}}})


def test_field_mapping_and_prompt_cap_keys():
    assert check_config({"task": "data/qa.csv", "question_field": "problem",
                         "answer_field": "solution"})["question_field"] == "problem"
    assert check_config({"task": "gsm8k", "eval_task": "held/out.parquet",
                         "question_field": "problem"})
    with pytest.raises(UserError, match=r"question_field 'problem' is set, but task "
                                        r"'chain_sum' is no data file of yours"):
        check_config({"question_field": "problem"})
    with pytest.raises(UserError, match="answer_field 'solution' is set, but task 'gsm8k'"):
        check_config({"task": "gsm8k", "answer_field": "solution"})
    with pytest.raises(UserError, match="question_field and answer_field are both 'text'"):
        check_config({"task": "qa.jsonl", "question_field": "text", "answer_field": "text"})
    with pytest.raises(UserError, match="question_field = '' is empty"):
        check_config({"task": "qa.jsonl", "question_field": ""})
    assert check_config({"max_prompt_length": 256})["max_prompt_length"] == 256
    with pytest.raises(UserError, match="max_prompt_length = 0 is out of range"):
        check_config({"max_prompt_length": 0})
    for name in ("question_field", "answer_field", "max_prompt_length", "reward_plugins"):
        assert name in schema.JOB_KEY_NAMES and name not in schema.TRL_FIELDS, name
        assert KEYS[name].resume == "fixed", name
