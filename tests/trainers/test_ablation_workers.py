"""`--workers N`: runs of an ablation at the same time, each child pinned to its own cores
(or GPUs). The slots are disjoint and refused when there are too few cores or GPUs; a
miniature ablation with 2 workers runs its two trained runs at once, each on its own core,
and gives exactly the numbers of the same ablation with 1 worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnrl.errors import UserError
from trainers.ablation.workers import (
    AFFINITY_ENV,
    pin_from_env,
    slot_env,
    split_evenly,
    visible_gpus,
    worker_slots,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "credit_ablation.py"


@pytest.mark.parametrize("n, parts", [(2, 2), (8, 3), (7, 7), (16, 4), (5, 1)])
def test_split_evenly_is_a_partition_with_sizes_within_one(n, parts):
    items = list(range(n))
    chunks = split_evenly(items, parts)
    assert len(chunks) == parts and [x for c in chunks for x in c] == items
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_slots_cpu_gpu_and_refusals(capsys):
    assert worker_slots(1, cpus=[0, 1], gpus=[]) == [{}]  # one worker: nothing pinned
    assert worker_slots(2, cpus=[0, 1], gpus=[]) == [{"cpus": [0]}, {"cpus": [1]}]
    assert worker_slots(2, cpus=[3, 1, 2, 0], gpus=[]) == [{"cpus": [0, 1]}, {"cpus": [2, 3]}]
    # an 8-GPU node: one GPU per run (a run is one process), cores are left to the runs
    eight = [str(g) for g in range(8)]
    assert worker_slots(8, cpus=range(16), gpus=eight) == [{"gpus": [g]} for g in eight]
    assert worker_slots(4, cpus=range(16), gpus=eight) == [{"gpus": [g]} for g in "0123"]
    assert "4,5,6,7 stay idle" in capsys.readouterr().out
    with pytest.raises(UserError, match="--workers 3 but this process may use 2 CPU core"):
        worker_slots(3, cpus=[0, 1], gpus=[])
    with pytest.raises(UserError, match="--workers 9 but 8 GPU"):
        worker_slots(9, cpus=range(64), gpus=[str(g) for g in range(8)])
    with pytest.raises(UserError, match="give 1 or more"):
        worker_slots(0, cpus=[0], gpus=[])


def test_remaining_time_counts_rounds_of_workers():
    from trainers.ablation.runs import remaining

    assert remaining(7, [900, 1000], 2) == "; 7 runs left, about 1 h 03 min"  # 4 rounds
    assert remaining(1, [60], 1) == "; 1 run left, about 1 min"
    assert remaining(0, [60], 1) == "" and remaining(3, [], 1) == ""


def test_idle_core_hint_only_where_cores_would_stay_idle():
    from trainers.ablation.workers import idle_core_hint

    assert "--workers 2 would run 2 at a time" in idle_core_hint(1, {}, cpus=[0, 1], gpus=[])
    assert idle_core_hint(1, {"OMP_NUM_THREADS": "1"}, cpus=range(4), gpus=[]) is not None
    assert idle_core_hint(2, {}, cpus=[0, 1], gpus=[]) is None          # already parallel
    assert idle_core_hint(1, {}, cpus=[0], gpus=[]) is None             # one core
    assert idle_core_hint(1, {"OMP_NUM_THREADS": "2"}, cpus=[0, 1], gpus=[]) is None
    assert idle_core_hint(1, {}, cpus=range(16), gpus=["0"]) is None    # a GPU node


def test_visible_gpus_reads_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_slot_env_and_pinning_in_a_child():
    env = slot_env({"cpus": [0]}, {"PATH": os.environ["PATH"]})
    assert env[AFFINITY_ENV] == "0" and "CUDA_VISIBLE_DEVICES" not in env
    assert slot_env({"gpus": ["2", "3"]}, {})["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert pin_from_env({}) is None
    # a real child process pins itself; its threads started afterwards inherit the core
    code = ("import os, threading; from trainers.ablation.workers import pin_from_env; "
            "print(pin_from_env()); out = []; "
            "t = threading.Thread(target=lambda: out.append(sorted(os.sched_getaffinity(0)))); "
            "t.start(); t.join(); print(out[0])")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), AFFINITY_ENV: "0"},
                           check=True)
    assert child.stdout.split("\n")[:2] == ["[0]", "[0]"]


def ablate(*args, **env_overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_overrides)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_two_workers_run_at_once_on_their_own_cores_and_change_no_number(tmp_path,
                                                                          tiny_model_dir):
    common = ("--budget", "tiny", "--model", tiny_model_dir, "--strategies", "uniform,random",
              "--seeds", "0")
    # the CPU path (cores as slots) also on a machine with GPUs
    serial = ablate(*common, "--out", tmp_path / "one", CUDA_VISIBLE_DEVICES="")
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-3000:]
    parallel = ablate(*common, "--out", tmp_path / "two", "--workers", 2,
                      CUDA_VISIBLE_DEVICES="")
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]

    assert "; 1 run left, about" in serial.stdout  # after the first of the two trained runs
    assert "--workers 2 would run 2 at a time" in serial.stdout
    assert "would run" not in parallel.stdout
    lines = parallel.stdout.splitlines()
    starts = {name: i for i, line in enumerate(lines) for name in ("uniform", "random")
              if f"{name}-seed0: training + evaluating on CPU" in line}
    first_done = min(i for i, line in enumerate(lines) if "-seed0 done in" in line)
    assert len(starts) == 2 and max(starts.values()) < first_done  # both started at once
    pinned = set()
    for name in ("uniform", "random"):
        log = (tmp_path / "two" / "runs" / f"{name}-seed0" / "log.txt").read_text()
        pinned |= {line for line in log.splitlines() if line.startswith("pinned to CPU")}
    assert len(pinned) == 2  # two different cores, one each
    assert "pinned to CPU" not in (tmp_path / "one" / "runs" / "uniform-seed0" /
                                   "log.txt").read_text()

    def numbers(out):
        runs = {}
        for name in ("uniform", "random"):
            run_dir = out / "runs" / f"{name}-seed0"
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if x.strip()]
            model = json.loads((run_dir / "eval.json").read_text())["models"][0]
            runs[name] = ([(r["step"], r.get("reward"), r.get("loss")) for r in rows
                           if "reward" in r], model["greedy_correct"], model["pass_at_k"])
        return runs

    assert numbers(tmp_path / "one") == numbers(tmp_path / "two")
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["table"] == two["table"]


def test_too_many_workers_is_one_line_before_anything_runs(tmp_path):
    result = ablate("--budget", "tiny", "--out", tmp_path / "x", "--workers",
                    len(os.sched_getaffinity(0)) + 1, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--workers" in result.stderr
    assert not (tmp_path / "x").exists()


def test_scheduler_keeps_order_bounds_concurrency_and_reports_failures(tmp_path, monkeypatch):
    """execute_all with 2 slots over 5 runs (execute() replaced by a timed stand-in: the
    scheduler is what is tested): starts in the given order, never more than 2 at once, each
    slot used by one run at a time, a failed run reported and the others summarised."""
    import argparse
    import threading
    import time

    from trainers.ablation import runs as runs_module

    lock, active, log = threading.Lock(), set(), []

    def fake_execute(run, keep_checkpoints=False, slot=None):
        key = slot["cpus"][0]
        with lock:
            assert key not in active  # a slot holds one run at a time
            active.add(key)
            log.append(("start", run["strategy"], len(active)))
        time.sleep(0.05 * (1 + run["seed"] % 2))
        with lock:
            active.discard(key)
        return 1 if run["strategy"] == "c" else 0

    monkeypatch.setattr(runs_module, "execute", fake_execute)
    items = [{"strategy": name, "seed": i, "dir": tmp_path / name}
             for i, name in enumerate("abcde")]
    after = []
    failed = runs_module.execute_all(items, 1, 5, argparse.Namespace(keep_checkpoints=False),
                                     lambda: after.append(1),
                                     slots=[{"cpus": [0]}, {"cpus": [1]}])
    assert failed == ["c-seed2"] and len(after) == 4
    assert [s for _, s, _ in log] == list("abcde")
    assert max(n for _, _, n in log) == 2
