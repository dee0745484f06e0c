"""Every shipped YAML config loads, validates and builds its trainer config; the experiment
configs say what their file names say; unknown keys fail loudly."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from attnrl.errors import UserError
from trainers.job import JOB_FIELDS, load_config, trainer_config_class

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + \
    sorted((REPO / "configs" / "experiments").glob("*.yaml"))
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
CREDIT_BY_ARM = {"coupled": "coupled", "local": "local_chunk", "global": "global_anchor",
                 "uniform": "uniform"}


def ids(paths):
    return [str(p.relative_to(REPO / "configs")) for p in paths]


def test_configs_are_shipped():
    assert len(EXPERIMENTS) >= 22  # 2 models x 2 contexts x 4 credits + 4 countdown + 2 nsr


@pytest.mark.parametrize("path", CONFIGS, ids=ids(CONFIGS))
def test_config_loads_and_builds_trainer_config(path):
    config = load_config(path)
    assert config, "empty config"
    deepspeed = config.get("deepspeed")
    if deepspeed:
        assert (REPO / deepspeed).is_file(), f"{path.name}: deepspeed file {deepspeed} missing"
    # TRL's own checks (batch divisibility, exclusive options) run in the config class;
    # built here on CPU, without the GPU-only settings
    cls = trainer_config_class(config.get("trainer", "grpo"))
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields and k not in JOB_FIELDS}
    kwargs.update(bf16=False, use_cpu=True, deepspeed=None, report_to="none",
                  output_dir="unused")
    args = cls(**kwargs)
    assert args.generation_batch_size % args.num_generations == 0


@pytest.mark.parametrize("path", EXPERIMENTS, ids=ids(EXPERIMENTS))
def test_experiment_matches_its_name(path):
    config = load_config(path)
    name = path.stem
    assert config["output_dir"] == f"outputs/{name}" and config["run_name"] == name
    assert config["learning_rate"] == pytest.approx(1e-6)       # both papers
    assert config["beta"] == 0.0 and config["temperature"] == 1.0
    if name.startswith("qwen3-"):
        size, task, arm = re.fullmatch(r"qwen3-(\d+)b-base_([a-z0-9-]+)_(\w+)", name).groups()
        assert config["model"] == f"models/Qwen3-{size.upper()}B-Base"
        assert config["credit"] == CREDIT_BY_ARM[arm]
        assert config["advantage_estimator"] == "grpo" and config["trainer"] == "grpo"
        assert config.get("signal_layers") is None   # middle third of the real model
        assert config["gamma_amp"] == 1.5 and config["signal_q"] == 0.4
        assert config["generation_batch_size"] == 512
        if task.startswith("math-"):
            budget = {"1k": 1024, "8k": 8192}[task.split("-")[1]]
            assert config["max_completion_length"] == budget
            assert config["rollout_max_model_len"] > budget
            assert config["rewards"] == {"math": 1.0}
        else:
            assert task == "countdown" and config["task"] == "countdown"
    else:
        estimator = {"nsr": "nsr", "w-reinforce": "w_reinforce"}[name.rsplit("_", 1)[1]]
        assert config["advantage_estimator"] == estimator and config["trainer"] == "nsr"
        assert config["epsilon"] == 0.2 and config["entropy_coef"] == 0.001


def test_unknown_key_fails_loudly(tmp_path, capsys):
    source = EXPERIMENTS[0].read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(source.replace("learning_rate:", "learning_rat:"))
    with pytest.raises(UserError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        load_config(bad)
    from attnrl.cli import main

    assert main(["train", "--config", str(bad)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_unknown_credit_and_estimator_fail(tmp_path):
    config = yaml.safe_load(EXPERIMENTS[0].read_text())
    for key, value, hint in (("credit", "coupld", "coupled"),
                             ("advantage_estimator", "grpoo", "grpo")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({**config, key: value}))
        with pytest.raises(UserError, match=hint):
            load_config(path)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=ids(EXPERIMENTS))
def test_long_completion_configs_state_their_importance_sampling_mode(path):
    """Above LONG_COMPLETION tokens the mode is token-level by default; the shipped configs
    say so themselves, with a comment (trainers/schema_engine.py)."""
    from trainers.schema_engine import LONG_COMPLETION

    raw = yaml.safe_load(path.read_text())
    if raw["max_completion_length"] <= LONG_COMPLETION:
        return
    assert raw.get("vllm_importance_sampling_mode") in ("token_truncate", "token_mask")
    line = next(t for t in path.read_text().splitlines()
                if t.startswith("vllm_importance_sampling_mode:"))
    assert "#" in line
