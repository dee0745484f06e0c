"""Real `attnrl train` runs of a tiny model: the resolved config is recorded (output_dir,
every checkpoint, W&B, model card) and reproduces the run; a changed config is refused
before anything heavy loads; an overwritten run leaves nothing to resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainers import run_dir

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
KEYS = ("reward", "loss", "grad_norm", "accuracy", "completions/mean_length",
        "credit/gamma_mean")


def train(*args, cwd, **env_vars):
    env = {**os.environ, "WANDB_MODE": "offline", **env_vars}
    env.pop("WANDB_DIR", None)  # W&B files go under the run's output_dir
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "attnrl.cli", "train", *map(str, args)],
                            check=False, capture_output=True, text=True, timeout=600,
                            cwd=cwd, env=env)
    result.seconds = time.perf_counter() - start
    return result


def metrics(out) -> dict:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if not r.get("summary")]
    assert len(steps) == len(set(steps)), f"a step number twice in metrics.jsonl: {steps}"
    assert all("train_runtime" in r for r in rows if r.get("summary"))
    return {r["step"]: r for r in rows if "reward" in r}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    """Two steps with a checkpoint each, W&B offline."""
    root = tmp_path_factory.mktemp("record")
    out = root / "a"
    result = train("--config", TINY, "--model", tiny_model_dir, "--output_dir", out,
                   "--max_steps", 2, "--save_steps", 1, "--report_to", "wandb", "--resume",
                   "auto", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out, result


def test_resolved_config_is_recorded_everywhere(first_run, tiny_model_dir):
    root, out, result = first_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(tiny_model_dir) and saved["task"] == "chain_sum"
    assert saved["task_kwargs"] == {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                    "max_digits": 1}
    assert saved["rewards"] == {"format": 1.0} and saved["trainer"] == "grpo"
    assert saved["lora"] is None and saved["task_seed"] == 0 and saved["max_steps"] == 2
    assert saved["qk_top_k"] == 4 and saved["loss_type"] == "dapo"  # defaults written out
    assert saved["recorded"]["versions"]["trl"] and "--max_steps 2" in \
        saved["recorded"]["command"]
    for step in (1, 2):
        assert yaml.safe_load((out / f"checkpoint-{step}" / "config.yaml").read_text()) == saved
    card = (out / "final" / "README.md").read_text()
    assert str(tiny_model_dir) in card and "chain_sum" in card and "| credit strategy | " \
        "coupled |" in card and "attnrl train --config" in card
    # one optimizer step = per-device batch x accumulation x processes completions
    assert "| steps | 2 x 8 completions (1 prompts x 8 samples; micro-batch 8 x 1 " \
        "accumulation)" in card
    assert "[None]" not in (out / "README.md").read_text()  # TRL's card replaced by ours
    # final/ carries the config the card points to; the record is complete
    assert yaml.safe_load((out / "final" / "config.yaml").read_text()) == saved
    fields = saved["recorded"]["trainer_fields"]
    assert len(fields) > 150 and fields["adam_beta1"] == 0.9 and fields["use_cpu"] is True
    assert saved["recorded"]["model_sha256"] == run_dir.model_sha256(tiny_model_dir)
    assert len(saved["recorded"]["commands"]) == 1
    # the config gives no device keys: chosen from the machine, said once
    assert result.stdout.count("device: CPU (no CUDA device found); chose use_cpu true, "
                               "bf16 false") == 1
    assert saved["use_cpu"] is True and saved["bf16"] is False
    metrics(out)  # unique step numbers, the summary row marked
    assert not (root / "wandb").exists()
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"task_kwargs" in data and b"min_digits" in data and b"versions" in data
    # output to a file: no terminal codes, no progress bars, W&B's lines replaced by one
    assert "\x1b[" not in result.stdout + result.stderr
    assert "it/s]" not in result.stdout + result.stderr
    assert result.stdout.count("W&B offline run: ") == 1
    # one start-up line with the versions; none of the known harmless warnings
    assert "transformers " in result.stdout and "| trl " in result.stdout
    for noise in ("TRL currently supports vLLM", "Setting accelerator to CPU", "Weave",
                  "URL not available"):
        assert noise not in result.stderr + result.stdout, noise


def test_credit_pages_and_wandb_table_at_every_logging_step(first_run):
    """logging_steps 1, log_credit_completions 2 (default): OUTPUT_DIR/credit/step-N.html
    for both steps, each with 2 completions whose every token is a coloured span, and the
    W&B table credit/completions in the offline run (2 rows a step)."""
    import json

    _, out, _ = first_run
    pages = sorted((out / "credit").glob("step-*.html"))
    assert [p.name for p in pages] == ["step-000001.html", "step-000002.html"]
    for page in pages:
        text = page.read_text()
        assert text.count("<h3>completion ") == 2 and "<span title='token 0 " in text
    tables = sorted((out / "wandb").glob("offline-run-*/files/media/table/credit/"
                                         "completions_*.table.json"))
    assert len(tables) == 2, tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "outcome_advantage", "prompt", "tokens"]
    assert len(table["data"]) == 2 and table["data"][0][1] >= table["data"][1][1]


@pytest.mark.parametrize("change, field", [(("--credit", "global_anchor"), "credit"),
                                           (("--learning_rate", 0.5), "learning_rate")])
def test_changed_config_is_refused_fast(first_run, change, field):
    root, out, _ = first_run
    result = train("--config", out / "config.yaml", *change, cwd=root)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{field}: " in lines[0] and "different config" in lines[0]
    assert result.seconds < 3.0, result.seconds


def test_recorded_config_reproduces_the_run(first_run):
    root, out, _ = first_run
    again = root / "b"
    result = train("--config", out / "config.yaml", "--output_dir", again, "--report_to",
                   "none", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WANDB" not in result.stdout and "wandb" not in result.stderr  # not reporting to it
    a, b = metrics(out), metrics(again)
    assert sorted(a) == sorted(b) == [1, 2]
    for key in KEYS:
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-6, abs=1e-9), key
    assert a[1]["grad_norm"] > 0


def test_overwritten_run_leaves_nothing_to_resume(first_run):
    root, out, _ = first_run
    new = ("--config", out / "config.yaml", "--seed", 1, "--max_steps", 1, "--report_to",
           "none")
    refused = train(*new, "--resume", "never", cwd=root)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    result = train(*new, "--resume", "never", "--overwrite", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert yaml.safe_load((out / "checkpoint-1" / "config.yaml").read_text())["seed"] == 1
    assert sorted(metrics(out)) == [1]
    # the same (new) run resumes from its own checkpoint; it is complete, so it trains no
    # step past max_steps, and metrics stay one run
    resumed = train(*new, "--resume", "auto", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"the run is complete ({out / 'checkpoint-1'} is step 1 of 1)" in resumed.stdout
    assert sorted(metrics(out)) == [1]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    # every command that touched the run, in order (the overwrite started it anew)
    commands = yaml.safe_load((out / "config.yaml").read_text())["recorded"]["commands"]
    assert len(commands) == 2 and "--overwrite" in commands[0]["command"] and \
        "--resume auto" in commands[1]["command"]


def test_wandb_online_without_a_key_is_one_line_before_anything_loads(tmp_path,
                                                                     tiny_model_dir):
    """WANDB_MODE=online and no API key (no WANDB_API_KEY, no netrc entry): exit 2 in one
    line before the model loads; nothing is written."""
    out = tmp_path / "run"
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    result = train("--config", TINY, "--model", tiny_model_dir, "--output_dir", out,
                   "--report_to", "wandb", cwd=tmp_path, **env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs a W&B API key" in result.stderr and "Traceback" not in result.stderr
    assert "loading the policy" not in result.stdout and not out.exists()


@pytest.mark.slow
def test_wandb_host_that_does_not_answer_falls_back_to_offline(tmp_path, tiny_model_dir):
    """A key but no reachable W&B host (this machine reaches no W&B server): the run logs
    offline, says so in one line with how to upload, and trains."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    result = train("--config", TINY, "--model", tiny_model_dir, "--output_dir", out,
                   "--report_to", "wandb", "--max_steps", 1, cwd=tmp_path,
                   WANDB_MODE="online", WANDB_API_KEY="x" * 40,
                   WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"W&B: 127.0.0.1:{port} does not answer" in result.stdout
    assert "logging offline" in result.stdout and (out / "final").is_dir()
    assert list((out / "wandb").glob("offline-run-*"))
