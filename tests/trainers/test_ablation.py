"""Credit ablation: a miniature end-to-end ablation (tiny model, 2 strategies, 1 seed,
2 steps, hf engine) whose summary and PNG agree with the per-run logs (held-out learning
curve, area, steps to target), that resumes without redoing finished work; the paired t
interval, the curve area and steps-to-target against plain references."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "credit_ablation.py"


def ablate(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)


def jsonl_rewards(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "reward" in r}


@pytest.mark.slow
def test_miniature_ablation_end_to_end_and_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "ablation"
    args = ("--budget", "tiny", "--model", tiny_model_dir, "--strategies", "uniform,random",
            "--seeds", "0", "--out", out)
    first = ablate(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    png = out / "credit_ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    runs = {r["strategy"]: r for r in summary["runs"]}
    assert sorted(runs) == ["random", "uniform"]
    logged = {}
    for strategy, entry in runs.items():
        run_dir = out / "runs" / f"{strategy}-seed0"
        assert entry["status"] == "done"
        logged[strategy] = jsonl_rewards(run_dir / "metrics.jsonl")
        # reward curve values are the trainer's own metrics.jsonl rewards
        assert sorted(logged[strategy]) == [1, 2] == entry["steps"]
        assert entry["rewards"] == [logged[strategy][s]["reward"] for s in entry["steps"]]
        curve = summary["curves"][strategy]  # one seed: mean == the run, spread 0
        assert curve["mean"] == entry["rewards"] and curve["std"] == [0.0, 0.0]
        # held-out accuracy is the eval JSON's, on the task seed + 10000 split
        result = json.loads((run_dir / "eval.json").read_text())
        assert result["seed"] == summary["settings"]["task_seed"] + 10_000
        assert result["task"] == summary["settings"]["task"]
        model = result["models"][0]
        assert model["model"] == str(run_dir / "final")
        # the final evaluation is the job's own (heldout/after.json, the trained weights)
        after = json.loads((run_dir / "heldout" / "after.json").read_text())["models"][0]
        assert after["greedy_correct"] == model["greedy_correct"] and after["step"] == 2
        row = next(r for r in summary["table"] if r["strategy"] == strategy)
        assert row["accuracy"] == [model["greedy_accuracy"]]
        assert row["pass@1"] == model["pass_at_k"]["1"]
        # learning curve: step 1 from the job, step 0 the untrained model, step 2 the end
        curve_rows = [json.loads(x) for x in
                      (run_dir / "heldout" / "curve.jsonl").read_text().splitlines()]
        assert [c["step"] for c in curve_rows] == [1]
        untrained_acc = json.loads((out / "untrained" / "eval.json").read_text()
                                   )["models"][0]["greedy_accuracy"]
        a0, a1, a2 = untrained_acc, curve_rows[0]["greedy_accuracy"], model["greedy_accuracy"]
        assert entry["auc"] == pytest.approx(((a0 + a1) / 2 + (a1 + a2) / 2) / 2)
        config = json.loads((run_dir / "run.json").read_text())["config"]
        assert config["credit"] == strategy and config["output_dir"] == str(run_dir)
        assert config["eval_every"] == 1 and config["eval_before"] is False
    rows = {r["strategy"]: r for r in summary["table"]}
    assert rows["random"]["diff_final_per_seed"] == [rows["random"]["accuracy"][0]
                                                     - rows["uniform"]["accuracy"][0]]
    assert rows["random"]["diff_final"]["mean"] == pytest.approx(
        rows["random"]["diff_final_per_seed"][0])
    assert rows["random"]["diff_final"]["low"] is None  # one seed: no interval
    assert "1 seed" in rows["random"]["verdict"]
    # the untrained model is evaluated once on the same split, as a reference
    untrained = json.loads((out / "untrained" / "eval.json").read_text())
    assert untrained["seed"] == summary["settings"]["task_seed"] + 10_000
    assert Path(untrained["models"][0]["model"]) == Path(tiny_model_dir).resolve()
    assert summary["untrained"]["greedy_accuracy"] == untrained["models"][0]["greedy_accuracy"]
    assert not (out / "untrained" / "final").exists()
    # identical data order and rollout settings: before any update, step 1 of both
    # strategies saw the same prompts and sampled the same completions
    for key in ("reward", "reward_std", "completions/mean_length"):
        assert logged["uniform"][1][key] == logged["random"][1][key], key
    # the strategies did differ: random credit amplified tokens, uniform none
    assert logged["uniform"][1]["credit/frac_amplified"] == 0
    assert logged["random"][1]["credit/frac_amplified"] > 0
    table_text = first.stdout[first.stdout.index("# held-out"):]
    assert "uniform" in table_text and "random" in table_text and "95% t interval" in table_text
    assert (out / "table.md").read_text().startswith("# held-out")

    # re-run: finished runs are skipped; a run missing its evaluation is only evaluated
    uniform_dir, random_dir = out / "runs" / "uniform-seed0", out / "runs" / "random-seed0"
    stamps = {p: p.stat().st_mtime_ns for p in (uniform_dir / "eval.json",
                                                uniform_dir / "metrics.jsonl",
                                                random_dir / "metrics.jsonl")}
    old_random_eval = json.loads((random_dir / "eval.json").read_text())
    (random_dir / "eval.json").unlink()
    second = ablate(*args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "skip uniform-seed0: finished" in second.stdout
    assert "skip untrained: finished" in second.stdout
    assert "random-seed0: evaluating" in second.stdout
    assert "random-seed0: training" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    new_random_eval = json.loads((random_dir / "eval.json").read_text())
    assert new_random_eval["models"][0]["greedy_accuracy"] == \
        old_random_eval["models"][0]["greedy_accuracy"]

    # other settings in the same directory: refused before anything runs
    third = ablate(*args, "--steps", 3)
    assert third.returncode == 2 and "other settings" in third.stderr


def t_cdf(x, df, steps=20000):
    """Student t CDF by Simpson integration of the density from 0 (plain reference)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_paired_t_interval_matches_reference():
    from trainers.ablation import T975, paired_t_interval

    for df, q in enumerate(T975, start=1):
        assert t_cdf(q, df) == pytest.approx(0.975, abs=2e-5), df
    rng = random.Random(0)
    for _ in range(300):
        m = rng.randint(2, 12)
        diffs = [rng.gauss(0.05, 0.1) for _ in range(m)]
        mean = sum(diffs) / m
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (m - 1))
        half = T975[m - 2] * sd / math.sqrt(m)
        got = paired_t_interval(diffs)
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["low"] == pytest.approx(mean - half, abs=1e-12)
        assert got["high"] == pytest.approx(mean + half, abs=1e-12)
    assert paired_t_interval([0.1])["low"] is None


def test_curve_area_and_steps_to_target_match_reference():
    import numpy as np

    from trainers.ablation import curve_area, steps_to_target

    rng = random.Random(1)
    for _ in range(100):
        last = rng.randint(2, 40)
        inner = sorted(rng.sample(range(1, last), rng.randint(0, min(5, last - 1))))
        steps = [0, *inner, last]
        accs = [rng.random() for _ in steps]
        want = np.trapezoid(accs, steps) / last
        assert curve_area(list(zip(steps, accs)), last) == pytest.approx(want, abs=1e-12)
        rewards = [rng.random() for _ in range(last)]
        target = rng.uniform(0.3, 0.7)
        expected = None
        for i in range(last):
            window = rewards[max(0, i - 4):i + 1]
            if sum(window) / len(window) >= target:
                expected = i + 1
                break
        assert steps_to_target(list(range(1, last + 1)), rewards, target) == expected
    assert curve_area([(1, 0.5), (4, 0.6)], 4) is None  # no step-0 point
