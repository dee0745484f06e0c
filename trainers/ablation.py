"""Credit ablation (`attnrl ablate`): one GRPO job under several credit strategies and
seeds, a held-out learning curve per run, and a table of paired differences to uniform.

Every run of a seed shares that seed's data order, rollout sampling seeds and step budget;
runs differ only in `credit` (and `credit_seed`, which is the seed). Runs execute one
after another, each in its own process, in seed-major order (all strategies of seed 0
first), so a cut-off ablation still covers every strategy. Re-running the same command
skips finished runs and resumes a half-finished one from its last checkpoint.

Layout of the output directory:
    ablation.json                  the shared settings (a re-run must match them)
    untrained/eval.json            the starting model on the held-out problems (step 0)
    runs/<strategy>-seed<k>/       trainer output_dir: metrics.jsonl, final/, heldout/
                                   (curve.jsonl, after.json), log.txt, train_done.json,
                                   eval.json (= heldout/after.json)
    summary.json, credit_ablation.png

Per run: held-out greedy accuracy at the end, the area under the held-out learning curve
(greedy accuracy at step 0 = the untrained model, every `eval_every` steps, and at the
end; trapezoids, divided by the step count: the mean accuracy over training) and the
first step at which the training reward's trailing 5-step average reaches the target
reward. Per strategy: the paired differences to uniform over seeds (same seed = same data
order, rollout seeds and held-out problems) with a t interval (see `paired_t_interval`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from attnrl.errors import UserError

DEFAULT_STRATEGIES = ("uniform", "random", "coupled", "local_chunk", "global_anchor")
BASELINE = "uniform"
HELDOUT_SEED_OFFSET = 10_000
PRIMARY_METRIC = "greedy_accuracy"
SMOOTH_WINDOW = 5  # steps-to-target uses the trailing 5-step average of the training reward

# Budget presets: config overrides of the training job, held-out evaluation (problems,
# samples per problem for pass@k, token cap, engine, learning-curve interval `every`), seeds,
# and the training reward whose first crossing is reported (`target_reward`).
# tiny: tests (a random tiny model; a format reward gives every group a reward spread).
# cpu: SmolLM2-135M full fine-tune on 2 CPU cores, sized from the measured recipe (uniform
#   credit, lr 1e-5, 4 prompts x 8 samples, 64 tokens: held-out greedy 34% -> 71% after 40
#   steps); 16 steps put uniform between the start and the ceiling. Micro-batches of 8
#   (4 accumulated) keep the peak near 5 GB. ~15-25 min per run on 2 idle cores (far more
#   on shared ones), 5 strategies x 3 seeds in several hours.
# medium / large: GPU nodes.
BUDGETS = {
    "tiny": {
        "train": {"task_size": 8, "max_steps": 2, "save_steps": 1, "num_generations": 2,
                  "per_device_train_batch_size": 4, "max_completion_length": 8,
                  "rollout_engine": "hf", "report_to": "none", "learning_rate": 1e-3,
                  "signal_h_lo": 2, "signal_h_hi": 8, "signal_window": 4,
                  "gradient_checkpointing": False, "rewards": {"format": 1.0},
                  "reward_options": {"format": {"pattern": "[A-Z]"}}, "instruction": ""},
        "eval": {"num_problems": 3, "n": 2, "max_tokens": 8, "engine": "hf", "every": 1},
        "seeds": [0],
        "target_reward": 0.5,
    },
    "cpu": {
        "train": {"task_size": 512, "max_steps": 16, "save_steps": 4, "save_total_limit": 1,
                  "num_generations": 8, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 4, "max_completion_length": 64,
                  "gradient_checkpointing": False,
                  "rollout_engine": "vllm", "learning_rate": 1e-5, "report_to": "none",
                  "lr_scheduler_type": "constant", "beta": 0.0, "instruction": ""},
        "eval": {"num_problems": 128, "n": 2, "max_tokens": 64, "engine": "vllm", "every": 4},
        "seeds": [0, 1, 2],
        "target_reward": 0.4,
    },
    "medium": {
        "train": {"task_size": 2048, "max_steps": 200, "save_steps": 50,
                  "save_total_limit": 1, "num_generations": 8,
                  "per_device_train_batch_size": 64, "max_completion_length": 256,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 256, "n": 8, "max_tokens": 256, "engine": "vllm",
                 "every": 25},
        "seeds": [0, 1, 2],
        "target_reward": 0.5,
    },
    "large": {
        "train": {"task_size": 8192, "max_steps": 1000, "save_steps": 100,
                  "save_total_limit": 1, "num_generations": 16,
                  "per_device_train_batch_size": 128, "max_completion_length": 512,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 1024, "n": 16, "max_tokens": 512, "engine": "vllm",
                 "every": 100},
        "seeds": [0, 1, 2],
        "target_reward": 0.5,
    },
}
EVAL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}  # those of `attnrl eval`

# ---------------------------------------------------------------------------- planning

def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def plan(base_config: dict, eval_settings: dict, strategies, seeds, out_dir) -> list[dict]:
    """One entry per (seed, strategy), seed-major: {'strategy', 'seed', 'dir', 'config'}.
    The config is the base with credit / seed / output_dir / run_name and the held-out
    evaluation keys (learning curve every `eval_settings['every']` steps, final
    evaluation with pass@k, no separate before-evaluation: that is the untrained run)."""
    from trainers.job import validate_config

    heldout = {"eval_size": eval_settings["num_problems"], "eval_samples": eval_settings["n"],
               "eval_max_tokens": eval_settings["max_tokens"],
               "eval_temperature": eval_settings["temperature"],
               "eval_every": eval_settings["every"], "eval_before": False, "eval_after": True,
               "eval_seed": heldout_seed(base_config)}

    runs = []
    for seed in seeds:
        for strategy in strategies:
            run_dir = Path(out_dir) / "runs" / run_name(strategy, seed)
            config = {**base_config, "credit": strategy, "seed": int(seed),
                      "credit_seed": int(seed), "output_dir": str(run_dir),
                      "run_name": f"{Path(out_dir).name}-{run_name(strategy, seed)}",
                      "resume": "auto", **heldout}
            validate_config(config, source=f"run {run_name(strategy, seed)}")
            runs.append({"strategy": strategy, "seed": int(seed), "dir": run_dir,
                         "config": config, "eval": eval_settings})
    return runs


def check_strategies(strategies) -> None:
    from attnrl.credit import strategy_parts

    if not strategies:
        raise UserError("--strategies is empty; give names such as uniform,random,coupled")
    for name in strategies:
        strategy_parts(name)  # raises naming the registered strategies
    if len(set(strategies)) != len(strategies):
        raise UserError(f"--strategies lists a strategy twice: {','.join(strategies)}")


def record_settings(out_dir: Path, settings: dict, write: bool = True) -> None:
    """Write ablation.json (if `write`), or check that an existing one holds the same
    settings."""
    path = out_dir / "ablation.json"
    if path.exists():
        old = json.loads(path.read_text())
        flat_old, flat_new = _flatten(old), _flatten(settings)
        diff = sorted(k for k in set(flat_old) | set(flat_new)
                      if flat_old.get(k) != flat_new.get(k))
        if diff:
            raise UserError(f"{out_dir} holds an ablation with other settings ({', '.join(diff)} "
                            "differ); resume it with the same options or give a new --out")
        return
    if not write:
        raise UserError(f"{out_dir} holds no ablation (no ablation.json); run it without "
                        "--summary-only first, or give the --out of an existing one")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


# ---------------------------------------------------------------------------- one run

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


def execute(run: dict, keep_checkpoints: bool = False) -> int:
    """Train (resuming from a checkpoint if any) and evaluate one run in a child process;
    its output is appended to <run dir>/log.txt. Returns the exit status."""
    run["dir"].mkdir(parents=True, exist_ok=True)
    spec = {"config": run["config"], "eval": run["eval"], "keep_checkpoints": keep_checkpoints,
            "train": run.get("train", True)}
    _write_json(run["dir"] / "run.json", spec)
    env = dict(os.environ, WANDB_DIR=str(run["dir"]))
    for key, value in (("OMP_NUM_THREADS", "1"), ("WANDB_MODE", "offline"),
                       ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        env.setdefault(key, value)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(run["dir"] / "log.txt", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run_status(run)}\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "trainers.ablation", str(run["dir"])],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                              check=False)
    return proc.returncode


def _worker(run_dir: Path) -> None:
    """Child process: train unless train_done.json exists (the job evaluates the learning
    curve and the final model on the held-out problems, heldout/), then copy the final
    evaluation to eval.json. The untrained model (the spec says no training) is evaluated
    with attnrl.evaluation on the same problems and settings."""
    spec = json.loads((run_dir / "run.json").read_text())
    config = spec["config"]
    if spec.get("train", True):
        after = run_dir / "heldout" / "after.json"
        if not (run_dir / "train_done.json").exists() or not after.exists():
            from trainers.cli import run_job

            start = time.perf_counter()
            run_job(config)
            _write_json(run_dir / "train_done.json",
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
    _write_json(run_dir / "eval.json", result)
    print(f"eval: greedy accuracy {result['models'][0]['greedy_accuracy']:.3f}", flush=True)


def heldout_seed(config: dict) -> int:
    return int(config.get("task_seed", 0)) + HELDOUT_SEED_OFFSET


def evaluate_run(model_dir: Path, config: dict, settings: dict) -> dict:
    """`attnrl eval` of one checkpoint on the held-out split (same task and task kwargs,
    task seed + HELDOUT_SEED_OFFSET), prompts formatted as in training, greedy included."""
    from attnrl.data import DEFAULT_INSTRUCTION
    from attnrl.evaluation import evaluate

    instruction = config.get("instruction")
    settings = {k: v for k, v in settings.items() if k != "every"}
    return evaluate([str(model_dir)], config.get("task", "chain_sum"),
                    seed=heldout_seed(config), greedy=True,
                    task_kwargs=config.get("task_kwargs") or {},
                    instruction=DEFAULT_INSTRUCTION if instruction is None else instruction,
                    system_prompt=config.get("system_prompt"), **settings)


# ---------------------------------------------------------------------------- summary

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


def _mean(values):
    return sum(values) / len(values) if values else None


def _std(values):
    """Sample standard deviation (ddof 1); 0 for one value, None for none."""
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# two-sided 95% quantiles of Student's t, df = 1..30 (t_{0.975, df})
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def paired_t_interval(diffs: list[float]) -> dict:
    """Mean of paired differences (one per seed) with a 95% t interval:
    mean +- t_{0.975, m-1} sd / sqrt(m), sd with ddof 1 (m > 30: the normal 1.96).
    With fewer than 2 differences there is no interval (low = high = None)."""
    m = len(diffs)
    if m == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = _mean(diffs)
    if m < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = (T975[m - 2] if m - 1 <= len(T975) else 1.959964) * _std(diffs) / math.sqrt(m)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": m}


def curve_area(points: list[tuple[int, float]], last_step: int) -> float | None:
    """Area under a held-out learning curve [(step, accuracy)] from step 0 to `last_step`
    by trapezoids, divided by `last_step`: the mean accuracy over training. None unless
    the curve has a step-0 point and a `last_step` point."""
    points = sorted(points)
    if not points or points[0][0] != 0 or points[-1][0] != last_step or last_step <= 0:
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2
               for (s0, a0), (s1, a1) in itertools.pairwise(points))
    return area / last_step


def steps_to_target(steps: list[int], rewards: list[float], target: float,
                    window: int = SMOOTH_WINDOW) -> int | None:
    """First step at which the trailing `window`-step mean training reward is >= target
    (None: never)."""
    from trainers.callbacks import smooth

    for step, value in zip(steps, smooth(rewards, window)):
        if value >= target:
            return step
    return None


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


def verdict(diff: dict, what: str, higher_is_better: bool = True) -> str:
    if diff["n"] == 0:
        return "no data"
    if diff["low"] is None:
        return f"{diff['n']} seed: no interval yet"
    if diff["low"] > 0 or diff["high"] < 0:
        better = (diff["low"] > 0) == higher_is_better
        return f"{'better' if better else 'worse'} than uniform ({what})"
    return f"no difference shown ({what})"


def summarize(runs: list[dict], settings: dict, untrained: dict | None = None) -> dict:
    """summary.json content from the runs' metrics.jsonl, heldout/curve.jsonl and
    eval.json files and the untrained model's eval.json (the step-0 point)."""
    max_steps = int(settings["base_config"].get("max_steps", 0))
    target = float(settings.get("target_reward", 0.5))
    reference = None
    if untrained is not None and run_status(untrained) == "done":
        reference = read_heldout(untrained["dir"])
    entries = []
    for run in runs:
        steps, rewards = read_rewards(run["dir"] / "metrics.jsonl")
        entry = {"strategy": run["strategy"], "seed": run["seed"], "status": run_status(run),
                 "dir": str(run["dir"]), "steps": steps, "rewards": rewards, "heldout": None,
                 "curve": read_curve(run["dir"]), "auc": None,
                 "steps_to_target": steps_to_target(steps, rewards, target)}
        if entry["status"] == "done":
            entry["heldout"] = read_heldout(run["dir"])
            if reference is not None:
                points = [(0, reference["greedy_accuracy"]), *entry["curve"],
                          (max_steps, entry["heldout"]["greedy_accuracy"])]
                entry["auc"] = curve_area(points, max_steps)
        entries.append(entry)
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    n = settings["eval"]["n"]
    done = {(e["strategy"], e["seed"]): e for e in entries if e["heldout"]}
    censored = max_steps + 1  # 'never reached' counts as one step past the budget

    def metric(e, name):
        if name == "final":
            return e["heldout"]["greedy_accuracy"]
        if name == "auc":
            return e["auc"]
        return censored if e["steps_to_target"] is None else e["steps_to_target"]

    curves, table = {}, []
    for strategy in strategies:
        mine = [e for e in entries if e["strategy"] == strategy and e["steps"]]
        steps = sorted({s for e in mine for s in e["steps"]})
        per_step = [[e["rewards"][e["steps"].index(s)] for e in mine if s in e["steps"]]
                    for s in steps]
        curves[strategy] = {"steps": steps, "mean": [_mean(v) for v in per_step],
                            "std": [_std(v) for v in per_step],
                            "seeds": [len(v) for v in per_step]}
        finished = [e for e in entries if e["strategy"] == strategy and e["heldout"]]
        row = {"strategy": strategy, "seeds_done": [e["seed"] for e in finished],
               "accuracy": [metric(e, "final") for e in finished],
               "auc": [e["auc"] for e in finished],
               "steps_to_target": [e["steps_to_target"] for e in finished],
               "pass@1": _mean([e["heldout"]["pass_at_k"]["1"] for e in finished]),
               f"pass@{n}": _mean([e["heldout"]["pass_at_k"][str(n)] for e in finished])}
        row["mean"] = _mean(row["accuracy"])
        row["std"] = _std(row["accuracy"])
        row["auc_mean"] = _mean([v for v in row["auc"] if v is not None])
        reached = [v for v in row["steps_to_target"] if v is not None]
        row["steps_to_target_mean"] = _mean(reached)
        row["target_reached"] = f"{len(reached)}/{len(finished)}"
        # paired differences to uniform: same seed, both finished
        pairs = [(done[(strategy, s)], done[(BASELINE, s)]) for s in row["seeds_done"]
                 if (BASELINE, s) in done]
        for name in ("final", "auc", "steps"):
            diffs = [metric(a, name) - metric(b, name) for a, b in pairs
                     if metric(a, name) is not None and metric(b, name) is not None]
            row[f"diff_{name}"] = paired_t_interval(diffs)
            row[f"diff_{name}_per_seed"] = diffs
        if strategy == BASELINE:
            row["verdict"] = "baseline"
        else:
            parts = [verdict(row["diff_final"], "final accuracy"),
                     verdict(row["diff_auc"], "area under curve")]
            row["verdict"] = "; ".join(dict.fromkeys(parts))
        table.append(row)
    learned = None
    if reference is not None:
        base_rows = [e for e in entries if e["strategy"] == BASELINE and e["heldout"]]
        learned = paired_t_interval([e["heldout"]["greedy_accuracy"]
                                     - reference["greedy_accuracy"] for e in base_rows])
        if base_rows and reference.get("greedy_correct") and \
                base_rows[0]["heldout"].get("greedy_correct"):
            from attnrl.evaluation import paired_interval

            # every seed's problems pooled: correctness of uniform vs untrained per problem
            after = [c for e in base_rows for c in e["heldout"]["greedy_correct"]]
            before = reference["greedy_correct"] * len(base_rows)
            learned["per_problem"] = paired_interval(after, before)
    return {"settings": settings, "metric": PRIMARY_METRIC, "baseline": BASELINE,
            "interval": "95% t interval over seeds of paired differences (same seed = same "
                        "data order, rollout seeds and held-out problems)",
            "target_reward": target, "untrained": reference, "uniform_vs_untrained": learned,
            "runs": entries, "curves": curves, "table": table}


def _pct(value, fmt=".1f"):
    return "-" if value is None else format(100 * value, fmt)


def _ci(diff: dict, scale: float = 100.0, fmt: str = "+.1f") -> str:
    if diff["mean"] is None:
        return "-"
    text = format(scale * diff["mean"], fmt)
    if diff["low"] is None:
        return f"{text} (1 seed)"
    return f"{text} [{format(scale * diff['low'], fmt)}, {format(scale * diff['high'], fmt)}]"


def table_rows(summary: dict) -> list[list[str]]:
    """The table's cells: strategy, seeds, final greedy %, AUC %, pass@1 %, steps to the
    target reward, the three paired differences to uniform [95% CI], verdict."""
    rows = []
    for row in summary["table"]:
        steps = "-" if row["steps_to_target_mean"] is None else \
            f"{row['steps_to_target_mean']:.1f} ({row['target_reached']})"
        is_base = row["strategy"] == BASELINE
        rows.append([row["strategy"], str(len(row["accuracy"])), _pct(row["mean"]),
                     _pct(row["auc_mean"]), _pct(row["pass@1"]), steps,
                     "-" if is_base else _ci(row["diff_final"]),
                     "-" if is_base else _ci(row["diff_auc"]),
                     "-" if is_base else _ci(row["diff_steps"], 1.0, "+.1f"),
                     row["verdict"]])
    return rows


HEADERS = ["strategy", "seeds", "final greedy %", "AUC %", "pass@1 %", "steps to target",
           "diff final [95% CI]", "diff AUC [95% CI]", "diff steps [95% CI]", "verdict"]


def format_table(summary: dict) -> str:
    """A markdown table of table_rows with the untrained reference and the settings."""
    ev = summary["settings"]["eval"]
    title = (f"# held-out {summary['settings']['task']} (task seed "
             f"{summary['settings']['heldout_seed']}): {ev['num_problems']} problems, greedy "
             f"(+ {ev['n']} samples at T={ev['temperature']} for pass@1); learning curve every "
             f"{ev['every']} steps; target training reward {summary['target_reward']} "
             f"({SMOOTH_WINDOW}-step average)")
    lines = [title]
    ref = summary.get("untrained")
    if ref is not None:
        lines.append(f"# untrained model: greedy {_pct(ref['greedy_accuracy'])}%, pass@1 "
                     f"{_pct(ref['pass_at_k']['1'])}%")
    learned = summary.get("uniform_vs_untrained")
    if learned and learned["mean"] is not None:
        text = f"# uniform vs untrained: {_ci(learned)} points (over seeds)"
        if "per_problem" in learned:
            pp = learned["per_problem"]
            text += (f"; per problem, seeds pooled: {100 * pp['mean']:+.1f} [{100 * pp['low']:+.1f},"
                     f" {100 * pp['high']:+.1f}]")
        lines.append(text)
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + " --- |" * len(HEADERS))
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(summary)]
    lines.append(f"# {summary['interval']}; steps never reached count as max_steps + 1")
    return "\n".join(lines)


def _legend(ax) -> None:
    """A legend when some curve has a label (none before the first finished run)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_summary(summary: dict, path: Path) -> Path:
    """Training reward (mean over seeds) and held-out learning curves per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers.callbacks import smooth

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    colors = {}
    for strategy, curve in summary["curves"].items():
        if not curve["steps"]:
            continue
        line, = ax.plot(curve["steps"], smooth(curve["mean"], SMOOTH_WINDOW),
                        label=f"{strategy} ({max(curve['seeds'])} seeds)")
        colors[strategy] = line.get_color()
    ax.axhline(summary["target_reward"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training reward ({SMOOTH_WINDOW}-step avg, mean over seeds)")
    ax.grid(alpha=0.3)
    _legend(ax)
    max_steps = int(summary["settings"]["base_config"].get("max_steps", 0))
    ref = summary.get("untrained")
    for strategy in summary["curves"]:
        runs = [e for e in summary["runs"] if e["strategy"] == strategy and e["heldout"]]
        if not runs or ref is None:
            continue
        steps = sorted({0, max_steps, *(s for e in runs for s, _ in e["curve"])})
        values = []
        for step in steps:
            vals = []
            for e in runs:
                pts = dict([(0, ref["greedy_accuracy"]), *map(tuple, e["curve"]),
                            (max_steps, e["heldout"]["greedy_accuracy"])])
                if step in pts:
                    vals.append(pts[step])
            values.append(_mean(vals))
        ax2.plot(steps, [100 * v for v in values], marker="o",
                 color=colors.get(strategy), label=f"{strategy} ({len(runs)} seeds)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("held-out greedy accuracy % (mean over seeds)")
    ax2.grid(alpha=0.3)
    _legend(ax2)
    settings = summary["settings"]
    fig.suptitle(f"credit ablation: {Path(str(settings['model'])).name} on {settings['task']} "
                 f"({settings['budget']} budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_summary(runs, settings, out_dir: Path, untrained: dict | None = None) -> dict:
    summary = summarize(runs, settings, untrained)
    _write_json(out_dir / "summary.json", summary)
    plot_summary(summary, out_dir / "credit_ablation.png")
    (out_dir / "table.md").write_text(format_table(summary) + "\n")
    return summary


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="cpu",
                        help="preset: tiny (tests), cpu (SmolLM2 full fine-tune on 2 CPU "
                             "cores, ~15 min per run), medium / large (GPU nodes)")
    parser.add_argument("--model", default=None,
                        help="model directory or 'smollm2' (default: the config's)")
    parser.add_argument("--task", default=None,
                        help="task (default: the config's; another task drops the config's "
                             "task_kwargs unless --set task_kwargs=... is given)")
    parser.add_argument("--config", default=None,
                        help="base job YAML (default: configs/default.yaml)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help="comma-separated credit strategies (any registered name)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default: the budget's, 0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job config key (YAML value); repeatable")
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--eval-n", type=int, default=None, help="samples per problem")
    parser.add_argument("--eval-max-tokens", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None,
                        help="learning-curve interval in steps (default: the budget's)")
    parser.add_argument("--target-reward", type=float, default=None,
                        help="training reward for 'steps to target' (default: the budget's)")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results/credit_ablation_BUDGET)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the checkpoint-* dirs of finished runs (default: delete "
                             "them; final/ is kept)")
    parser.add_argument("--summary-only", action="store_true",
                        help="rebuild summary.json and the PNG from finished runs; train nothing")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def build(args) -> tuple[list[dict], dict, Path, dict]:
    """(runs, settings, out_dir, untrained run) from parsed arguments; validates before
    anything runs."""
    from trainers.job import load_config, parse_overrides

    budget = BUDGETS[args.budget]
    if args.budget == "tiny" and args.model is None:
        raise UserError("--budget tiny needs --model DIR (a saved tiny model, e.g. from "
                        "attnrl.models.save_tiny_model)")
    overrides = dict(budget["train"])
    items = []
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set learning_rate=1e-5")
        items.append("--" + item)
    user = parse_overrides(items)
    overrides.update(user)
    for key, value in (("model", args.model), ("task", args.task), ("max_steps", args.steps)):
        if value is not None:
            overrides[key] = value
    if args.task is not None and "task_kwargs" not in user and \
            args.task != load_config(args.config).get("task"):
        overrides["task_kwargs"] = {}  # the config's task_kwargs belong to its own task
    base = load_config(args.config, overrides)
    for key in ("credit", "seed", "credit_seed", "output_dir", "run_name", "eval_size",
                "eval_seed", "eval_samples", "eval_temperature", "eval_max_tokens",
                "eval_before", "eval_after", "eval_every", "eval_task", "reasoning_vector"):
        base.pop(key, None)  # set per run (or not used by the ablation)
    if base.get("model") not in (None, "smollm2"):
        base["model"] = str(Path(base["model"]).resolve())
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    check_strategies(strategies)
    seeds = parse_seeds(args.seeds) if args.seeds else list(budget["seeds"])
    ev = {**EVAL_DEFAULTS, **budget["eval"]}
    for key, value in (("num_problems", args.eval_problems), ("n", args.eval_n),
                       ("max_tokens", args.eval_max_tokens), ("every", args.eval_every)):
        if value is not None:
            ev[key] = value
    if ev["num_problems"] < 2 or ev["n"] < 1 or ev["max_tokens"] < 1 or ev["every"] < 0:
        raise UserError("--eval-problems must be >= 2, --eval-n and --eval-max-tokens >= 1, "
                        "--eval-every >= 0")
    out = Path(args.out or f"benchmarks/results/credit_ablation_{args.budget}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    settings = {"budget": args.budget, "model": base.get("model", "smollm2"),
                "task": base.get("task", "chain_sum"), "task_seed": base.get("task_seed", 0),
                "heldout_seed": heldout_seed(base), "base_config": base, "eval": ev,
                "target_reward": budget["target_reward"] if args.target_reward is None
                else args.target_reward}
    runs = plan(base, ev, strategies, seeds, out)
    return runs, settings, out, base_run(base, ev, out)


def run(args) -> int:
    runs, settings, out, untrained = build(args)
    failed = []
    record_settings(out, settings, write=not args.summary_only)
    if not args.summary_only:
        for i, item in enumerate([untrained, *runs]):
            name = "untrained" if i == 0 else run_name(item["strategy"], item["seed"])
            status = run_status(item)
            if status == "done":
                print(f"[{i}/{len(runs)}] skip {name}: finished (eval.json exists)", flush=True)
                continue
            what = "evaluating" if status == "evaluate" else "training + evaluating"
            print(f"[{i}/{len(runs)}] {time.strftime('%H:%M:%S')} {name}: {what} "
                  f"(log: {item['dir'] / 'log.txt'})", flush=True)
            start = time.perf_counter()
            code = execute(item, keep_checkpoints=args.keep_checkpoints)
            if code != 0:
                failed.append(name)
                print(f"    {name} FAILED (exit {code}); see {item['dir'] / 'log.txt'}",
                      flush=True)
                continue
            print(f"    {name} done in {time.perf_counter() - start:.0f} s", flush=True)
            write_summary(runs, settings, out, untrained)
    summary = write_summary(runs, settings, out, untrained)
    print(f"# wrote {out / 'summary.json'}, {out / 'credit_ablation.png'}")
    if failed:
        print(f"# failed runs: {', '.join(failed)} (re-run the same command to retry)")
    print(format_table(summary))
    return 1 if failed else 0


def _flatten(settings: dict) -> dict:
    """{'eval': {'n': 4}} -> {'eval.n': 4}; base_config keys keep their own names."""
    flat = {}
    for key, value in json.loads(json.dumps(settings, default=str)).items():
        if key in ("base_config", "eval"):
            prefix = "" if key == "base_config" else "eval."
            flat.update({prefix + k: v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _write_json(path: Path, data) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
