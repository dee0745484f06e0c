"""A run killed between steps resumes from its last checkpoint and produces the same
next-step metrics as an uninterrupted run with the same seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_resume_worker.py")
KEYS = ("reward", "loss", "grad_norm", "accuracy", "advantages/abs_mean",
        "completions/mean_length", "credit/gamma_mean", "credit/frac_amplified")


def run(config, stop_at=0):
    env = dict(os.environ, STOP_AT=str(stop_at),
               PYTHONPATH=str(Path(__file__).parents[2]))
    return subprocess.run([sys.executable, str(WORKER), json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=600)


def metrics(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text()
            .splitlines()]
    return {r["step"]: r for r in rows if "reward" in r}


@pytest.mark.slow
@pytest.mark.parametrize("credit", ["coupled", "random"])
def test_killed_run_resumes_with_identical_metrics(tmp_path, tiny_model_dir, credit):
    base = {"model": str(tiny_model_dir), "task": "chain_sum", "task_size": 16,
            "credit": credit, "rollout_engine": "hf", "report_to": "none",
            "max_steps": 4, "save_steps": 1, "per_device_train_batch_size": 4,
            "num_generations": 4, "max_completion_length": 24, "learning_rate": 1e-3,
            "signal_h_lo": 2, "signal_h_hi": 8, "gradient_checkpointing": False,
            # a reward that varies inside groups of a random tiny model (~half match)
            "rewards": {"answer": 1.0, "format": 0.5},
            "reward_options": {"format": {"pattern": r"\+|answer|equals|#|step"}}}
    whole = run({**base, "output_dir": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]

    crashed = run({**base, "output_dir": str(tmp_path / "crashed")}, stop_at=2)
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert not (tmp_path / "crashed" / "checkpoint-3").exists()
    resumed = run({**base, "output_dir": str(tmp_path / "crashed")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout

    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "crashed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    # the comparison is not vacuous: the run learned something between steps
    assert a[3]["grad_norm"] > 0 and a[3]["loss"] != a[4]["loss"]
