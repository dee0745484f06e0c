"""Held-out evaluation and reasoning vectors of a training job (tiny model, hf engine):
the before / after numbers are attnrl.evaluation's on the same problems, the summary's
paired interval is the plain formula, the merge written after training is exactly
target + alpha (trained - start), and bad keys fail before any model loads."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnrl.data import load_prompts
from attnrl.data.unseen import TrainingPool, normalize_question
from attnrl.errors import UserError
from trainers.job import CONFIG_DIR, load_config


def weights(folder):
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def tiny_job(tmp_path, model_dir, **extra):
    return load_config(CONFIG_DIR / "tiny.yaml", {
        "model": str(model_dir), "output_dir": str(tmp_path / "run"), "max_steps": 2,
        "per_device_train_batch_size": 4, "num_generations": 4, "eval_size": 4,
        "eval_samples": 2, "eval_every": 1, "eval_max_tokens": 8, **extra})


def _attnrl(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "attnrl.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_job_evaluates_before_after_and_applies_reasoning_vector(tmp_path, tiny_model_dir):
    from attnrl.evaluation import evaluate
    from attnrl.models import save_tiny_model
    from trainers.cli import run_job

    target_dir = save_tiny_model(tmp_path / "target", arch="llama", seed=7, num_heads=4,
                                 num_kv_heads=2)
    alpha = 0.5
    config = tiny_job(tmp_path, tiny_model_dir, reasoning_vector={
        "target": str(target_dir), "alpha": alpha, "out": str(tmp_path / "rv")})
    run_job(config)
    run = tmp_path / "run"
    held = run / "heldout"
    before, after = (json.loads((held / f"{k}.json").read_text()) for k in ("before", "after"))
    merged = json.loads((held / "merged.json").read_text())
    summary = json.loads((held / "summary.json").read_text())

    # the held-out problems are another seed of the training task, 4 of them, same for all,
    # none of them a training question; problems.jsonl has one row per problem
    for result in (before, after, merged):
        assert result["seed"] == config["task_seed"] + 10_000
        assert result["num_problems"] == 4 and result["n"] == 2
        assert result["heldout"]["problems"] == 4
    assert [s["question"] for s in before["samples"]] == \
        [s["question"] for s in after["samples"]]
    pool = {normalize_question(r.question) for r in load_prompts(
        config["task"], size=config["task_size"], seed=config["task_seed"],
        **config["task_kwargs"])}
    rows = [json.loads(x) for x in (held / "problems.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [p["question"] for p in before["problems"]]
    assert not {normalize_question(r["question"]) for r in rows} & pool
    assert [r["correct_after"] for r in rows] == after["models"][0]["greedy_correct"]
    assert summary["heldout"]["dropped_seen"] == before["heldout"]["dropped_seen"]
    # the learning curve has the step-1 point (step 2 is the final evaluation)
    curve = [json.loads(x) for x in (held / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [1]
    assert after["models"][0]["step"] == 2

    # before = attnrl.evaluation of the start model, after = of final/ (same greedy texts)
    kwargs = {"task": config["task"], "num_problems": 4, "n": 2, "temperature": 0.6,
              "max_tokens": 8, "engine": "hf", "seed": config["task_seed"] + 10_000,
              "greedy": True, "task_kwargs": config["task_kwargs"],
              "instruction": config.get("instruction"), "keep_texts": True,
              "pool": TrainingPool(config["task"], config["task_size"], config["task_seed"],
                                   config["task_kwargs"])}
    ref = evaluate([str(tiny_model_dir), str(run / "final")], **kwargs)
    for got, want in ((before, ref["models"][0]), (after, ref["models"][1])):
        assert [s["greedy"] for s in got["samples"]] == [s["greedy"] for s in want["samples"]]
        assert got["models"][0]["greedy_correct"] == want["greedy_correct"]

    # `attnrl eval --config RUN` takes the run's task, kwargs, prompt format, held-out
    # problems, size, samples, temperature, length and engine: the run's numbers, problem
    # by problem
    cli = _attnrl("eval", "--config", str(run), "--model", str(run / "final"), "--out",
                  str(tmp_path / "eval"))
    assert cli.returncode == 0, cli.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "passk.json").read_text())
    samples = [json.loads(x) for x in
               (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert again["engine"] == "hf" and again["n"] == 2 and again["max_tokens"] == 8
    assert [x["question"] for x in samples] == [x["question"] for x in after["problems"]]
    assert [x["greedy"] for x in samples] == [x["greedy"] for x in after["problems"]]
    for key in ("greedy_correct", "correct", "rewards"):
        assert again["models"][0][key] == after["models"][0][key], key
    # `attnrl generate --config RUN --json`: the run's final model on its held-out problems
    gen = _attnrl("generate", "--config", str(run), "--num-prompts", "2", "-n", "1", "--json")
    assert gen.returncode == 0, gen.stderr[-3000:]
    data = json.loads(gen.stdout)
    assert data["model"] == str(run / "final") and data["engine"] == "hf"
    assert data["task_kwargs"] == config["task_kwargs"] and data["max_tokens"] == 12
    assert [x["question"] for x in data["samples"]] == \
        [x["question"] for x in after["problems"][:2]]

    # merged == target + alpha (trained - start), bit-exact (float32 arithmetic)
    start, trained, target = weights(tiny_model_dir), weights(run / "final"), \
        weights(target_dir)
    out = weights(tmp_path / "rv")
    assert set(out) == set(target)
    moved = 0
    for name, t in target.items():
        expected = (t.float() + alpha * (trained[name].float() - start[name].float())).to(
            t.dtype)
        assert torch.equal(out[name], expected), name
        moved += not torch.equal(trained[name], start[name])
    assert moved > 0  # training changed weights, so the vector is not zero
    assert merged["models"][0]["model"] == str(tmp_path / "rv")

    # the summary's interval: normal, on paired per-problem greedy differences
    b = before["models"][0]["greedy_correct"]
    a = after["models"][0]["greedy_correct"]
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(len(d))
    got = summary["trained"]["greedy_diff"]
    assert got["mean"] == pytest.approx(statistics.fmean(d))
    assert got["low"] == pytest.approx(statistics.fmean(d) - 1.959964 * se)
    assert summary["lines"][0].startswith("held-out accuracy ")
    assert "on 4 unseen problems" in summary["lines"][0]
    assert "95% CI" in summary["lines"][0] and "one training run: 95% CI" in summary["lines"][0]
    assert "merge" in summary["lines"][2]
    png = run / "reward_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_interval_matches_reference():
    import random

    from attnrl.evaluation import paired_interval

    rng = random.Random(0)
    for _ in range(200):
        m = rng.randint(2, 60)
        before = [rng.random() < 0.3 for _ in range(m)]
        after = [rng.random() < 0.6 for _ in range(m)]
        d = [int(x) - int(y) for x, y in zip(after, before)]
        mean = statistics.fmean(d)
        half = 1.959964 * statistics.stdev(d) / math.sqrt(m)
        got = paired_interval(after, before)
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["low"] == pytest.approx(mean - half, abs=1e-12)
        assert got["high"] == pytest.approx(mean + half, abs=1e-12)
    with pytest.raises(UserError):
        paired_interval([1], [0])


@pytest.mark.parametrize("extra, message", [
    ({"eval_size": -1}, "eval_size = -1 is out of range; eval_size takes an integer >= 0"),
    ({"eval_size": 8, "task": "data/x.jsonl"}, "give eval_task"),
    ({"eval_before": "yes"}, "eval_before takes true or false"),
    ({"reasoning_vector": {"alpha": 1.0}}, "at least target"),
    ({"reasoning_vector": {"target": "x", "alpah": 1.0}}, "unknown keys ['alpah']"),
])
def test_bad_heldout_keys_fail_before_loading(extra, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(None, extra)
    assert message in str(err.value)


def test_default_job_keys_parse():
    from trainers.heldout import heldout_settings

    config = load_config(None)
    settings = heldout_settings(config)
    assert settings.enabled and settings.seed == config["task_seed"] + 10_000
    assert settings.task == config["task"] and settings.task_kwargs == config["task_kwargs"]
