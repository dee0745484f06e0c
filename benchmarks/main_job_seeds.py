"""A recipe over training seeds: the main job's claim as a recipe's, not one draw's.

    python benchmarks/main_job_seeds.py                       # configs/default.yaml, seeds 0-4
    python benchmarks/main_job_seeds.py --config configs/w_reinforce.yaml --name w_reinforce \
        --set credit=coupled --seeds 0 1 2 3 4
    python benchmarks/main_job_seeds.py --aggregate-only      # table from finished seeds

Each seed is one `attnrl train` of the config with `--seed S` (the training pool, its order
and the held-out problems come from task_seed and stay fixed; S changes initial sampling,
rollout seeds and data order). A seed whose results are already copied is skipped, a killed
seed resumes (`resume: auto` in its own output folder), so rerunning the same command continues.
Runs live under outputs/main_job_seeds/NAME/seedS (models deleted after the copy unless
--keep-models); benchmarks/results/main_job_seeds/NAME/ gets each seed's held-out summary,
per-problem rows, metrics and log, and the recipe's table.md and summary.json:

    per seed: greedy before -> after on the held-out problems (all equivalence-free: none has
              the question or canonical form of a training problem, checked again here)
    recipe:   mean gain over seeds, 95% t interval with the seed as the unit (n - 1 df)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
RUN_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
COPIED = ("heldout/summary.json", "heldout/problems.jsonl", "metrics.jsonl", "config.yaml")


def train_seed(config: str, seed: int, run_dir: Path, result_dir: Path, sets: list[str],
               keep_models: bool) -> None:
    """One `attnrl train` for this seed; its results copied to result_dir."""
    command = [str(ROOT / ".venv/bin/attnrl"), "train", "--config", config, "--seed", str(seed),
               "--output_dir", str(run_dir)]
    for item in sets:
        key, _, value = item.partition("=")
        command += [f"--{key}", value]
    result_dir.mkdir(parents=True, exist_ok=True)
    log = result_dir / "log.txt"
    print(f"seed {seed}: {' '.join(command)}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "a") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, **RUN_ENV})
    if code != 0:
        sys.exit(f"seed {seed} failed (exit {code}); see {log}; rerun this command to resume it")
    for name in COPIED:
        shutil.copy(run_dir / name, result_dir / Path(name).name)
    (result_dir / "wall_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    scrub(result_dir)
    if not keep_models:
        for path in [run_dir / "final", *run_dir.glob("checkpoint-*")]:
            shutil.rmtree(path, ignore_errors=True)


def scrub(folder: Path) -> None:
    """Write the machine's checkout path out of the copied files (logs and the recorded
    config name absolute paths): paths become relative to the repository."""
    for path in folder.iterdir():
        if path.is_file() and path.suffix in (".txt", ".yaml", ".json", ".jsonl"):
            text = path.read_text()
            clean = text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
            if clean != text:
                path.write_text(clean)


def equivalence_check(config: dict, rows: list[dict]) -> int:
    """How many held-out rows share a question or canonical form with the training pool
    (must be 0); rebuilt from the run's own config."""
    sys.path.insert(0, str(ROOT))
    from attnrl.data import PromptRecord
    from attnrl.data.unseen import TrainingPool, draw_unseen, normalize_question

    pool = TrainingPool.from_config(config)
    texts, forms = pool.keys()
    draw = draw_unseen(pool.task, len(rows), int(config.get("task_seed") or 0) + 10_000,
                       config.get("task_kwargs"), pool)
    by_text = {normalize_question(r.question): r for r in draw.records}
    from attnrl.data.equivalence import canonical_form
    bad = 0
    for row in rows:
        record = by_text.get(normalize_question(row["question"]))
        record = record or PromptRecord(question=row["question"], answer=row["gold"],
                                        source=pool.task, index=row["index"])
        bad += normalize_question(row["question"]) in texts or canonical_form(record) in forms
    return bad


def aggregate(result_root: Path, seeds: list[int], name: str) -> dict:
    """The recipe's table over the finished seeds."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from attnrl.analysis.stats import t_interval

    per_seed = []
    for seed in seeds:
        folder = result_root / f"seed{seed}"
        if not (folder / "summary.json").exists():
            continue
        scrub(folder)
        summary = json.loads((folder / "summary.json").read_text())
        rows = [json.loads(x) for x in (folder / "problems.jsonl").read_text().splitlines()]
        config = yaml.safe_load((folder / "config.yaml").read_text())
        trained = summary["trained"]
        per_seed.append({"seed": seed, "problems": len(rows),
                         "greedy_before": trained["greedy_before"],
                         "greedy_after": trained["greedy_after"],
                         "gain": trained["greedy_after"] - trained["greedy_before"],
                         "pass1_gain": (trained.get("pass1_after", 0) -
                                        trained.get("pass1_before", 0)),
                         "equivalent_to_training": equivalence_check(config, rows),
                         "heldout": summary.get("heldout"),
                         "wall_seconds": float((folder / "wall_seconds.txt").read_text())
                         if (folder / "wall_seconds.txt").exists() else None})
    result = {"name": name, "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed,
              "unit": "training seed (t interval over seeds, n - 1 df); the held-out problems "
                      "are the same for every seed"}
    gains = t_interval([r["gain"] for r in per_seed])
    if gains["low"] is not None:
        result.update(mean_gain=gains["mean"], sd_gain=gains["sd"],
                      ci=[gains["low"], gains["high"]],
                      mean_pass1_gain=statistics.mean(r["pass1_gain"] for r in per_seed))
    return result


def table(result: dict) -> str:
    count = result["per_seed"][0]["problems"] if result["per_seed"] else 0
    lines = [(f"# {result['name']}: held-out greedy accuracy per training seed ({count} "
              "unseen, equivalence-free problems)"),
             ("| seed | before % | after % | gain (points) | pass@1 gain | equivalent to "
              "training | wall s |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["per_seed"]:
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-"
        lines.append(f"| {r['seed']} | {100 * r['greedy_before']:.1f} | "
                     f"{100 * r['greedy_after']:.1f} | {100 * r['gain']:+.1f} | "
                     f"{100 * r['pass1_gain']:+.1f} | {r['equivalent_to_training']} | {wall} |")
    if "mean_gain" in result:
        lo, hi = result["ci"]
        lines.append(f"\nmean gain over {len(result['seeds'])} seeds: "
                     f"{100 * result['mean_gain']:+.1f} points (sd {100 * result['sd_gain']:.1f}; "
                     f"95% t interval over seeds {100 * lo:+.1f} to {100 * hi:+.1f}); "
                     f"pass@1 {100 * result['mean_pass1_gain']:+.1f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--name", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every seed (e.g. credit=coupled)")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--keep-models", action="store_true")
    args = parser.parse_args()
    result_root = ROOT / "benchmarks/results/main_job_seeds" / args.name
    if not args.aggregate_only:
        for seed in args.seeds:
            if (result_root / f"seed{seed}" / "summary.json").exists():
                print(f"seed {seed}: done, skipped")
                continue
            train_seed(args.config, seed, ROOT / "outputs/main_job_seeds" / args.name /
                       f"seed{seed}", result_root / f"seed{seed}", args.set, args.keep_models)
    result = aggregate(result_root, args.seeds, args.name)
    result.update(config=args.config, overrides=args.set)
    text = table(result)
    print(text)
    (result_root / "table.md").write_text(text)
    write_result(result_root / "summary.json", result)


if __name__ == "__main__":
    main()
