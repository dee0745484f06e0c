"""Credit ablation: a miniature end-to-end ablation (tiny model, 2 strategies, 1 seed,
2 steps, hf engine) whose summary and PNG agree with the per-run logs, that resumes
without redoing finished work; the noise rule against a plain reference; the LoRA merge
of a final adapter against W + (alpha / r) B A."""

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
        row = next(r for r in summary["table"] if r["strategy"] == strategy)
        assert row["accuracy"] == [model["greedy_accuracy"]]
        assert row["pass@1"] == model["pass_at_k"]["1"]
        config = json.loads((run_dir / "run.json").read_text())["config"]
        assert config["credit"] == strategy and config["output_dir"] == str(run_dir)
    rows = {r["strategy"]: r for r in summary["table"]}
    assert rows["random"]["diff_per_seed"] == [rows["random"]["accuracy"][0]
                                               - rows["uniform"]["accuracy"][0]]
    assert rows["random"]["diff"] == pytest.approx(rows["random"]["diff_per_seed"][0])
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
    assert "uniform" in table_text and "random" in table_text and "seed noise" in table_text

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


def reference_verdict(values, base):
    """|mean diff| < 2 SE (Welch, sample stds) or overlapping [min, max] ranges."""
    import statistics

    diff = statistics.fmean(values) - statistics.fmean(base)
    se = math.sqrt(statistics.variance(values) / len(values)
                   + statistics.variance(base) / len(base))
    overlap = not (max(values) < min(base) or max(base) < min(values))
    return diff, se, abs(diff) < 2 * se or overlap


def test_noise_verdict_matches_reference():
    from attnrl.ablation import noise_verdict

    rng = random.Random(0)
    outcomes = set()
    for _ in range(500):
        k_a, k_b = rng.randint(2, 5), rng.randint(2, 5)
        shift = rng.choice([0.0, 0.05, 0.3])
        spread = rng.choice([0.0, 0.01, 0.1])
        base = [rng.choice([0.2, 0.25]) + rng.gauss(0, spread) for _ in range(k_b)]
        values = [b + shift for b in
                  (rng.choice([0.2, 0.25]) + rng.gauss(0, spread) for _ in range(k_a))]
        diff, se, within = reference_verdict(values, base)
        got = noise_verdict(values, base)
        assert got["diff"] == pytest.approx(diff, abs=1e-12)
        assert got["se"] == pytest.approx(se, abs=1e-12)
        assert got["within_noise"] == within
        outcomes.add(within)
    assert outcomes == {True, False}  # the sweep exercises both verdicts
    one_seed = noise_verdict([0.3], [0.2, 0.25])
    assert one_seed["within_noise"] is None and "unknown" in one_seed["verdict"]


def test_lora_final_adapter_is_merged_for_evaluation(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from attnrl.ablation import final_model_dir
    from attnrl.models import load_model

    torch.manual_seed(0)
    r, alpha = 4, 8
    peft_model = get_peft_model(load_model(tiny_model_dir, dtype=torch.float32),
                                LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    lora_a = layer.lora_A["default"].weight.detach().clone()
    lora_b = layer.lora_B["default"].weight.detach().clone()
    run_dir = tmp_path / "run"
    peft_model.save_pretrained(run_dir / "final")

    merged = final_model_dir(run_dir, {"model": str(tiny_model_dir)})
    assert merged == run_dir / "final_merged" and (merged / "config.json").exists()
    base = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    weights = load_file(next(merged.glob("*.safetensors")))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name] + (alpha / r) * lora_b @ lora_a
    assert not torch.allclose(expected, base[name])
    torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6)
    other = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(weights[other], base[other], rtol=0, atol=0)
    assert final_model_dir(run_dir, {"model": str(tiny_model_dir)}) == merged  # cached
