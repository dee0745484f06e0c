"""Running one ablation run: its name and status, the child process that trains and
evaluates it (`python -m trainers.ablation RUN_DIR`), and reading back what it wrote
(metrics.jsonl rewards, eval.json, the held-out curve)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from attnrl.atomic import write_json
from trainers.ablation.reference import evaluate_run
from trainers.ablation.workers import describe, pin_from_env, slot_env


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def base_run(base_config: dict, eval_settings: dict, out_dir) -> dict:
    """The untrained model's evaluation on the same held-out split (a reference row)."""
    return {"strategy": "untrained", "seed": None, "dir": Path(out_dir) / "untrained",
            "config": base_config, "eval": eval_settings, "train": False}


def run_status(run: dict) -> str:
    """'done' (trained and evaluated), 'evaluate' (trained) or 'train'."""
    if (run["dir"] / "eval.json").exists():
        return "done"
    if (run["dir"] / "train_done.json").exists() or not run.get("train", True):
        return "evaluate"
    return "train"


def execute(run: dict, keep_checkpoints: bool = False, slot: dict | None = None) -> int:
    """Train (resuming from a checkpoint if any) and evaluate one run in a child process
    on `slot`'s cores or GPUs (workers.py; None: no pinning); its output is appended to
    <run dir>/log.txt. Returns the exit status."""
    run["dir"].mkdir(parents=True, exist_ok=True)
    spec = {"config": run["config"], "eval": run["eval"], "keep_checkpoints": keep_checkpoints,
            "train": run.get("train", True)}
    write_json(run["dir"] / "run.json", spec)
    env = slot_env(slot or {}, dict(os.environ, WANDB_DIR=str(run["dir"])))
    for key, value in (("OMP_NUM_THREADS", "1"), ("WANDB_MODE", "offline"),
                       ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        env.setdefault(key, value)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(run["dir"] / "log.txt", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run_status(run)} "
                  f"({describe(slot or {})})\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "trainers.ablation", str(run["dir"])],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                              check=False)
    return proc.returncode


def worker(run_dir: Path) -> None:
    """Child process: train unless train_done.json exists (the job evaluates the learning
    curve and the final model on the held-out problems, heldout/), then copy the final
    evaluation to eval.json. The untrained model (the spec says no training) is evaluated
    with attnrl.evaluation on the same problems and settings."""
    cores = pin_from_env()
    if cores is not None:
        print(f"pinned to CPU {','.join(map(str, sorted(os.sched_getaffinity(0))))}", flush=True)
    spec = json.loads((run_dir / "run.json").read_text())
    config = spec["config"]
    if spec.get("train", True):
        after = run_dir / "heldout" / "after.json"
        if not (run_dir / "train_done.json").exists() or not after.exists():
            from trainers.cli import run_job

            start = time.perf_counter()
            run_job(config)
            write_json(run_dir / "train_done.json",
                        {"seconds": time.perf_counter() - start,
                         "final": str(run_dir / "final")})
        if not spec.get("keep_checkpoints"):
            for ckpt in run_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        result = json.loads(after.read_text())
        result["models"][0]["model"] = str(run_dir / "final")
    else:
        from attnrl.models import resolve_model

        result = evaluate_run(resolve_model(config.get("model", "smollm2")), config,
                              spec["eval"])
        result["models"][0]["model"] = str(config.get("model", "smollm2"))  # not a local path
    write_json(run_dir / "eval.json", result)
    print(f"eval: greedy accuracy {result['models'][0]['greedy_accuracy']:.3f}", flush=True)


def read_rewards(metrics_path: Path) -> tuple[list[int], list[float]]:
    """(steps, mean rewards) of the logged training steps in a metrics.jsonl."""
    steps, rewards = [], []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("reward") is not None:
                steps.append(int(row["step"]))
                rewards.append(float(row["reward"]))
    return steps, rewards


def read_heldout(run_dir: Path) -> dict:
    model = json.loads((run_dir / "eval.json").read_text())["models"][0]
    return {"greedy_accuracy": model["greedy_accuracy"], "pass_at_k": model["pass_at_k"],
            "mean_reward": model["mean_reward"],
            "greedy_correct": model.get("greedy_correct")}


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "heldout" / "curve.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["greedy_accuracy"])) for r in rows]


def remaining(left: int, took: list[float], workers: int) -> str:
    """'; 7 runs left, about 1 h 05 min' from the mean time of the runs finished so far
    (runs in parallel: `workers` at a time); '' when none is left."""
    if left <= 0 or not took:
        return ""
    minutes = round(-(-left // workers) * sum(took) / len(took) / 60)
    hours = f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
    return f"; {left} run{'s' if left > 1 else ''} left, about {hours}"


def execute_all(items, first_index: int, total: int, args, after=None,
                slots=None) -> list[str]:
    """Run the unfinished `items` (finished ones are skipped), one per slot at a time in
    the given order (`slots`: workers.worker_slots; default one unpinned slot); `after()`
    once after each run that succeeded, in this thread. Returns the failed runs' names."""
    slots = list(slots or [{}])
    free, failed, running, took = list(range(len(slots))), [], {}, []
    left = sum(run_status(item) != "done" for item in items)

    def start(pool, i, item, name):
        slot_index = free.pop(0)
        status = run_status(item)
        what = "evaluating" if status == "evaluate" else "training + evaluating"
        where = f" on {describe(slots[slot_index])}" if len(slots) > 1 else ""
        print(f"[{i}/{total}] {time.strftime('%H:%M:%S')} {name}: {what}{where} "
              f"(log: {item['dir'] / 'log.txt'})", flush=True)
        future = pool.submit(execute, item, keep_checkpoints=args.keep_checkpoints,
                             slot=slots[slot_index])
        running[future] = (name, item, slot_index, time.perf_counter())

    def finish(future):
        nonlocal left
        name, item, slot_index, began = running.pop(future)
        free.append(slot_index)
        code = future.result()
        left -= 1
        if code != 0:
            failed.append(name)
            print(f"    {name} FAILED (exit {code}); see {item['dir'] / 'log.txt'}",
                  flush=True)
            return
        took.append(time.perf_counter() - began)
        print(f"    {name} done in {took[-1]:.0f} s{remaining(left, took, len(slots))}",
              flush=True)
        if after is not None:
            after()

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        for i, item in enumerate(items, start=first_index):
            name = "untrained" if item["seed"] is None else run_name(item["strategy"],
                                                                      item["seed"])
            if run_status(item) == "done":
                print(f"[{i}/{total}] skip {name}: finished (eval.json exists)", flush=True)
                continue
            while not free:
                for future in wait(list(running), return_when=FIRST_COMPLETED).done:
                    finish(future)
            start(pool, i, item, name)
        while running:
            for future in wait(list(running), return_when=FIRST_COMPLETED).done:
                finish(future)
    return failed
