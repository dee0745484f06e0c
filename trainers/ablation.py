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
reward (None = never: censored, see `censored_steps` and `paired_steps`). Per strategy:
the paired differences to uniform over seeds with a t interval (`paired_t_interval`); the
seed is the unit (same seed = same data order, rollout seeds and held-out problems), no
interval pools problems across seeds.

The registered tests (trainers/ablation_tests.py, stated under the table): the primary test
is coupled - uniform on AUC (paired t over seeds); every other arm and metric is a secondary
test, Holm-corrected; the positive control `uniform_half_lr` (uniform credit at half the
learning rate) has an effect predicted from uniform's own curves (about -4 AUC points at
the cpu budget) and is judged on AUC. If its interval excludes 0 below, 'no difference'
verdicts of the other arms are stated as such; if not, the table says that this budget
cannot decide and how many seeds would (`power_check`). `--until-half-width H --max-seeds
N` adds seeds one round at a time until every paired interval on AUC (the primary metric)
is narrower than +-H points, after at least SEQUENTIAL_MIN_SEEDS seeds, or N seeds are
spent (`stop_rule`).
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

from attnrl.analysis.stats import T975, t975  # noqa: F401  (T975: re-exported for tests)
from attnrl.errors import UserError
from attnrl.evaluation import HELDOUT_SEED_OFFSET
from trainers.ablation_tests import (
    CONTROL,
    VARIANTS,
    predicted_control_diff,
    registered,
    registered_lines,
)

DEFAULT_STRATEGIES = ("uniform", "coupled", "random", CONTROL)
BASELINE = "uniform"
POSITIVE_CONTROL = CONTROL  # uniform at half the learning rate (trainers/ablation_tests.py)
POSITIVE_CONTROL_LABEL = "positive control (expected: lower AUC than uniform, predicted below)"
CONTROL_DIRECTION = -1  # expected sign of (control - uniform) on final accuracy and area
DEFAULT_TARGET_HALF_WIDTH = 5.0  # points: the half-width seeds are estimated for [D]
SEQUENTIAL_MIN_SEEDS = 5  # --until-half-width stops no earlier [D]: stopping on a narrow
#   interval after 3 seeds lets the 95% interval miss 0 in up to 7.7% of null ablations; from
#   5 seeds on, 4.9-5.6% (simulated: tests/trainers/test_ablation.py)
ABLATION_FORMAT = 2  # ablation.json of format 1 (pooled intervals; held-out set that
#   overlapped the training pool) are refused: those runs are not mixed with new ones
METRIC_TEXT = {"final": "final accuracy", "auc": "area under curve"}
INTERVAL_TEXT = ("95% t interval over seeds of paired differences (the seed is the unit: same "
                 "seed = same data order, rollout seeds and held-out problems; no interval "
                 "pools problems across seeds; the intervals are not corrected for "
                 "multiplicity, the secondary tests below are: Holm)")
CENSORING_TEXT = ("steps to target: a run that never reached the target reward by max_steps "
                  "is censored: it counts in 'reached k/n' and ranks last in the median, never "
                  "as a number; the steps interval uses only the pairs where both runs "
                  "reached it (count shown), the earlier/later/tied/neither counts every pair")
PRIMARY_METRIC = "greedy_accuracy"
SMOOTH_WINDOW = 5  # steps-to-target uses the trailing 5-step average of the training reward

# Budget presets: config overrides of the training job, held-out evaluation (problems,
# samples per problem for pass@k, token cap, engine, learning-curve interval `every`), seeds,
# and the training reward whose first crossing is reported (`target_reward`).
# tiny: tests (a random tiny model; a format reward gives every group a reward spread).
# cpu: SmolLM2-135M full fine-tune on 2 CPU cores, the main job's recipe and task
#   (configs/default.yaml: its task, task_size and held-out problems, none in the training
#   pool; its learning rate, 4 prompts x 8 samples, 64 tokens, 16 steps). Micro-batches of 8
#   (4 accumulated) keep the peak near 5 GB. ~9 min per run on 2 idle cores (far more on
#   shared ones; never beside another vLLM process): 4 strategies x 5 seeds in about 3 h.
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
        "train": {"max_steps": 16, "save_steps": 4, "save_total_limit": 1,
                  "num_generations": 8, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 4, "max_completion_length": 64,
                  "gradient_checkpointing": False,
                  "rollout_engine": "vllm", "report_to": "none",
                  "lr_scheduler_type": "constant", "beta": 0.0, "instruction": ""},
        "eval": {"num_problems": 107, "n": 2, "max_tokens": 64, "engine": "vllm", "every": 4},
        "seeds": list(range(10)),   # 80% power at 3 AUC points (plan: benchmarks/results/
        #   credit_ablation_cpu_v3/PLAN.md)
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
            variant = VARIANTS.get(strategy, {})
            lr = {"learning_rate": float(base_config.get("learning_rate", 1e-6))
                  * variant["learning_rate_scale"]} if variant else {}
            config = {**base_config, **lr, "credit": variant.get("credit", strategy),
                      "seed": int(seed),
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
        if name not in VARIANTS:
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
        if "ablation_format" in diff:
            raise UserError(f"{out_dir} holds an ablation of an older format (its held-out "
                            "problems and intervals are not comparable); give a new --out")
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


def heldout_draw(config: dict, eval_settings: dict):
    """The runs' held-out problems (attnrl.data.unseen.UnseenDraw): task seed +
    HELDOUT_SEED_OFFSET, none in the training pool; UserError when too few exist."""
    from trainers.heldout_keys import heldout_settings

    return heldout_settings({**config, "eval_size": eval_settings["num_problems"],
                             "eval_seed": heldout_seed(config)}).draw()


def reference_eval_args(config: dict) -> dict:
    """What the untrained reference is evaluated on: the trained runs' own held-out
    evaluation (trainers.heldout_keys.heldout_settings of the same config: its eval task,
    gsm8k -> gsm8k:test, eval_task for a JSONL task; its task kwargs only on the training
    task; seed task seed + HELDOUT_SEED_OFFSET; the training pool left out; the prompt
    format of training)."""
    from attnrl.data import DEFAULT_INSTRUCTION
    from trainers.heldout_keys import heldout_settings

    heldout = heldout_settings({**config, "eval_seed": heldout_seed(config)})
    return {"task": heldout.task, "seed": heldout.seed, "task_kwargs": heldout.task_kwargs,
            "instruction": DEFAULT_INSTRUCTION if heldout.instruction is None
            else heldout.instruction, "system_prompt": heldout.system_prompt,
            "pool": heldout.pool}


def evaluate_run(model_dir: Path, config: dict, settings: dict) -> dict:
    """`attnrl eval` of one checkpoint on the held-out problems the trained runs evaluate
    (`reference_eval_args`), greedy included."""
    from attnrl.evaluation import evaluate

    settings = {k: v for k, v in settings.items() if k != "every"}
    args = reference_eval_args(config)
    return evaluate([str(model_dir)], args.pop("task"), greedy=True, **args, **settings)


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


Z80 = 0.8416  # the normal 80% quantile: seeds for ~80% power (normal approximation)


def paired_t_interval(diffs: list[float]) -> dict:
    """Mean of paired differences (one per seed: the seed is the unit) with a 95% t
    interval: mean +- t_{0.975, m-1} sd / sqrt(m) (`t975`), sd with ddof 1; also the
    half-width and sd. With fewer than 2 differences there is no interval
    (low = high = half_width = sd = None)."""
    m = len(diffs)
    if m < 2:
        return {"mean": _mean(diffs), "low": None, "high": None, "half_width": None,
                "sd": None, "n": m}
    mean, sd = _mean(diffs), _std(diffs)
    half = t975(m - 1) * sd / math.sqrt(m)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half,
            "sd": sd, "n": m}


def seeds_needed(sd: float | None, half_width: float | None, power_z: float = 0.0,
                 limit: int = 1000) -> int | None:
    """Smallest number of seeds n >= 2 with (t_{0.975, n-1} + power_z) sd / sqrt(n) <=
    half_width. power_z 0: the expected 95% half-width reaches `half_width`; power_z Z80:
    an effect of size `half_width` excludes 0 in about 80% of ablations. None when sd or
    half_width is unknown or half_width <= 0, or past `limit`."""
    if sd is None or half_width is None or not half_width > 0:
        return None
    for n in range(2, limit + 1):
        if (t975(n - 1) + power_z) * sd / math.sqrt(n) <= half_width:
            return n
    return None


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
    (None: never, i.e. censored at the last step)."""
    from trainers.callbacks import smooth

    for step, value in zip(steps, smooth(rewards, window)):
        if value >= target:
            return step
    return None


def censored_steps(values: list[int | None], max_steps: int) -> dict:
    """Steps to target of one strategy's runs, None = never reached by `max_steps`
    (censored: no number is made up for it). runs, reached, censored, `steps` of the runs
    that reached it (sorted), and the median with the censored runs ranked after every
    step: None with median_censored True when the median falls on a censored run."""
    reached = sorted(v for v in values if v is not None)
    n = len(values)
    ordered = reached + [math.inf] * (n - len(reached))
    median = _mean(ordered[(n - 1) // 2:n // 2 + 1]) if n else None
    censored_median = median is not None and math.isinf(median)
    return {"runs": n, "reached": len(reached), "censored": n - len(reached),
            "steps": reached, "median": None if censored_median else median,
            "median_censored": censored_median, "censored_at": max_steps}


def paired_steps(pairs: list[tuple[int | None, int | None]]) -> dict:
    """Paired steps to target, (strategy, uniform) per seed, None = censored.
    `both`: paired_t_interval of strategy minus uniform over the pairs where both runs
    reached the target (its n says how many; a censored run never enters it).
    Sign count over every pair: `earlier` / `later` / `tied` (the strategy reached it
    first / last / at the same step; a run that reached it is earlier than one that did
    not), `neither` (both censored: order unknown)."""
    both = [a - b for a, b in pairs if a is not None and b is not None]
    counts = {"earlier": 0, "later": 0, "tied": 0, "neither": 0}
    for a, b in pairs:
        if a is None and b is None:
            counts["neither"] += 1
        elif b is None or (a is not None and a < b):
            counts["earlier"] += 1
        elif a is None or a > b:
            counts["later"] += 1
        else:
            counts["tied"] += 1
    return {"both": paired_t_interval(both), "both_per_seed": both, "pairs": len(pairs),
            **counts}


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


def _side(diff: dict) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it holds 0 or is missing."""
    if diff is None or diff["low"] is None:
        return 0
    return 1 if diff["low"] > 0 else -1 if diff["high"] < 0 else 0


def power_check(diff: dict | None, target_half_width: float) -> dict:
    """What the positive control's paired interval against uniform (one metric) says about
    the power of the ablation. status: 'detected' (it excludes 0 in the expected
    direction, CONTROL_DIRECTION), 'not detected' (it holds 0), 'opposite' (it excludes 0
    the other way: the setup is suspect), 'no interval' (< 2 paired seeds), 'absent' (the
    control was not run). Unless detected, from the control's paired sd: `seeds_needed`
    (the expected half-width reaches its observed effect, when that has the expected
    sign), `seeds_needed_80` (about 80% power for that effect) and `seeds_for_target`
    (half-width `target_half_width`)."""
    if diff is None or diff["n"] == 0:
        return {"status": "absent" if diff is None else "no interval", "diff": diff}
    if diff["low"] is None:
        return {"status": "no interval", "diff": diff}
    side = _side(diff)
    status = ("detected" if side == CONTROL_DIRECTION else
              "opposite" if side == -CONTROL_DIRECTION else "not detected")
    out = {"status": status, "diff": diff}
    if status != "detected":
        effect = abs(diff["mean"]) if diff["mean"] * CONTROL_DIRECTION > 0 else None
        out.update(effect=effect, seeds_needed=seeds_needed(diff["sd"], effect),
                   seeds_needed_80=seeds_needed(diff["sd"], effect, Z80),
                   target_half_width=target_half_width,
                   seeds_for_target=seeds_needed(diff["sd"], target_half_width))
    return out


def verdict(diff: dict, what: str, power: dict | None = None) -> str:
    """Verdict of one arm on one metric; 'no difference' is stated as such only when the
    positive control was detected on that metric (`power`, from power_check)."""
    if diff["n"] == 0:
        return "no data"
    if diff["low"] is None:
        return f"{diff['n']} seed: no interval yet"
    side = _side(diff)
    if side:
        return f"{'better' if side > 0 else 'worse'} than uniform ({what})"
    status = "absent" if power is None else power["status"]
    if status == "no interval":
        return f"no difference shown ({what}; power not known yet: the positive control has no interval)"
    if status == "detected":
        return f"no difference ({what}; the positive control was detected at this budget)"
    if status == "absent":
        return f"no difference shown ({what}; power unknown: no positive control run)"
    return f"cannot decide at this budget ({what}: the positive control was not detected)"


def control_verdict(diff: dict, what: str, power: dict) -> str:
    """Verdict of the positive control's own row on one metric."""
    status = power["status"]
    if status in ("no interval", "absent"):
        return "no data" if diff["n"] == 0 else f"{diff['n']} seed: no interval yet"
    if status == "detected":
        return f"detected: below uniform, as expected ({what})"
    if status == "opposite":
        return (f"faster than uniform ({what}): opposite to the expected direction, check "
                "the setup; this budget cannot decide")
    text = f"NOT detected ({what}): this budget cannot decide"
    if power.get("seeds_needed"):
        text += f"; ~{power['seeds_needed']} seeds for a half-width at its effect"
    return text


def stop_rule(summary: dict, half_width: float, max_seeds: int, seeds_spent: int) -> str | None:
    """The sequential option's rule after a round of seeds: 'half-width' when every
    strategy's paired 95% interval against uniform on the area under the held-out curve
    (the primary metric) has a half-width below `half_width` (in points) and at least
    SEQUENTIAL_MIN_SEEDS seeds are spent; else 'max-seeds' when `seeds_spent` >= max_seeds;
    else None (another round). A strategy without an interval (fewer than 2 paired seeds)
    is not narrow."""
    rows = [r for r in summary["table"] if r["strategy"] != BASELINE]
    widths = [r["diff_auc"]["half_width"] for r in rows]
    if seeds_spent >= SEQUENTIAL_MIN_SEEDS and rows and \
            all(w is not None and 100 * w < half_width for w in widths):
        return "half-width"
    if seeds_spent >= max_seeds:
        return "max-seeds"
    return None


def summarize(runs: list[dict], settings: dict, untrained: dict | None = None,
              sequential: dict | None = None) -> dict:
    """summary.json content from the runs' metrics.jsonl, heldout/curve.jsonl and
    eval.json files and the untrained model's eval.json (the step-0 point). Every interval
    is over seeds; `sequential` (the state of --until-half-width) is recorded as given."""
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

    def metric(e, name):
        return e["heldout"]["greedy_accuracy"] if name == "final" else e["auc"]

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
               "positive_control": strategy == POSITIVE_CONTROL,
               "accuracy": [metric(e, "final") for e in finished],
               "auc": [e["auc"] for e in finished],
               "steps_to_target": [e["steps_to_target"] for e in finished],
               "pass@1": _mean([e["heldout"]["pass_at_k"]["1"] for e in finished]),
               f"pass@{n}": _mean([e["heldout"]["pass_at_k"][str(n)] for e in finished])}
        row["mean"] = _mean(row["accuracy"])
        row["std"] = _std(row["accuracy"])
        row["auc_mean"] = _mean([v for v in row["auc"] if v is not None])
        row["target"] = censored_steps(row["steps_to_target"], max_steps)
        # paired differences to uniform: same seed, both finished
        pairs = [(done[(strategy, s)], done[(BASELINE, s)]) for s in row["seeds_done"]
                 if (BASELINE, s) in done]
        for name in ("final", "auc"):
            diffs = [metric(a, name) - metric(b, name) for a, b in pairs
                     if metric(a, name) is not None and metric(b, name) is not None]
            row[f"diff_{name}"] = paired_t_interval(diffs)
            row[f"diff_{name}_per_seed"] = diffs
        row["diff_steps"] = paired_steps([(a["steps_to_target"], b["steps_to_target"])
                                          for a, b in pairs])
        table.append(row)
    target_half = (sequential["half_width"] if sequential else DEFAULT_TARGET_HALF_WIDTH) / 100
    rows = {r["strategy"]: r for r in table}
    control = rows.get(POSITIVE_CONTROL)
    power = {"control": POSITIVE_CONTROL, "expected": POSITIVE_CONTROL_LABEL,
             **{name: power_check(None if control is None else control[f"diff_{name}"],
                                  target_half) for name in ("final", "auc")}}
    for row in table:
        if row["strategy"] == BASELINE:
            row["verdict"] = "baseline"
            continue
        judge = control_verdict if row["positive_control"] else verdict
        parts = {}  # one verdict per metric; the same words for both metrics are merged
        for name in ("final", "auc"):
            text = judge(row[f"diff_{name}"], "{what}", power[name])
            parts.setdefault(text, []).append(METRIC_TEXT[name])
        row["verdict"] = "; ".join(text.replace("{what}", " and ".join(whats))
                                   for text, whats in parts.items())
    predicted = []
    if reference is not None:  # the control's prediction from uniform's own curves
        for e in entries:
            if e["strategy"] == BASELINE and e["heldout"]:
                value = predicted_control_diff(
                    [(0, reference["greedy_accuracy"]), *e["curve"],
                     (max_steps, e["heldout"]["greedy_accuracy"])], max_steps)
                if value is not None:
                    predicted.append(value)
    tests = registered(rows, predicted, len({r["seed"] for r in runs}))
    learned = None
    if reference is not None:  # the untrained model is one fixed reference: seeds vary
        learned = paired_t_interval([e["heldout"]["greedy_accuracy"]
                                     - reference["greedy_accuracy"] for e in entries
                                     if e["strategy"] == BASELINE and e["heldout"]])
    return {"settings": settings, "metric": PRIMARY_METRIC, "baseline": BASELINE,
            "interval": INTERVAL_TEXT, "censoring": CENSORING_TEXT,
            "target_reward": target, "untrained": reference, "uniform_vs_untrained": learned,
            "power": power, "registered": tests, "sequential": sequential, "runs": entries,
            "curves": curves, "table": table}


def _pct(value, fmt=".1f"):
    return "-" if value is None else format(100 * value, fmt)


def _ci(diff: dict, scale: float = 100.0, fmt: str = "+.1f", unit: str = "seed") -> str:
    if diff["mean"] is None:
        return "-"
    text = format(scale * diff["mean"], fmt)
    if diff["low"] is None:
        return f"{text} (1 {unit})"
    return f"{text} [{format(scale * diff['low'], fmt)}, {format(scale * diff['high'], fmt)}]"


def _target_cell(target: dict) -> str:
    """'2/3 (median 9)': runs that reached the target of those finished, and the median
    step with the censored runs ranked last ('>16' when it falls on one)."""
    text = f"{target['reached']}/{target['runs']}"
    if target["median"] is not None:
        return text + f" (median {target['median']:g})"
    if target["median_censored"]:
        return text + f" (median >{target['censored_at']})"
    return text


def _steps_cell(diff: dict) -> str:
    both = diff["both"]
    head = _ci(both, 1.0, unit="pair")
    return (f"{head} ({both['n']}/{diff['pairs']} pairs both reached); "
            f"{diff['earlier']}/{diff['later']}/{diff['tied']}/{diff['neither']}")


def table_rows(summary: dict) -> list[list[str]]:
    """The table's cells: strategy (the positive control labelled), seeds, final greedy %,
    AUC %, pass@1 %, runs that reached the target (median steps), the paired differences
    to uniform [95% CI over seeds] (steps: over the pairs that both reached it, then the
    earlier/later/tied/neither counts), verdict."""
    rows = []
    for row in summary["table"]:
        is_base = row["strategy"] == BASELINE
        name = row["strategy"]
        if row.get("positive_control"):
            name += f": {POSITIVE_CONTROL_LABEL}"
        rows.append([name, str(len(row["accuracy"])), _pct(row["mean"]),
                     _pct(row["auc_mean"]), _pct(row["pass@1"]), _target_cell(row["target"]),
                     "-" if is_base else _ci(row["diff_final"]),
                     "-" if is_base else _ci(row["diff_auc"]),
                     "-" if is_base else _steps_cell(row["diff_steps"]),
                     row["verdict"]])
    return rows


HEADERS = ["strategy", "seeds", "final greedy %", "AUC %", "pass@1 %",
           "reached target (median step)", "diff final [95% CI]", "diff AUC [95% CI]",
           "diff steps, pairs both reached [95% CI]; earlier/later/tied/neither", "verdict"]


def power_lines(summary: dict) -> list[str]:
    """The positive control's statement about this budget's power, for the table's text:
    judged on the area under the curve (the primary metric), final accuracy beside it."""
    power = summary["power"]
    name, auc = power["control"], power["auc"]
    if auc["status"] == "absent":
        return [(f"# POWER UNKNOWN: the positive control {name} was not run (add it to "
                 "--strategies); 'no difference shown' is no evidence of no effect")]
    if auc["status"] == "no interval":
        return [(f"# power not known yet: the positive control {name} has fewer than 2 "
                 "seeds paired with uniform")]
    diff = auc["diff"]
    if auc["status"] == "detected":
        lines = [(f"# positive control {name} detected on AUC ({_ci(diff)} points, expected "
                  "< 0): this budget shows an effect of that size; 'no difference' verdicts "
                  "beside it are stated as such")]
    else:
        how = ("was not detected" if auc["status"] == "not detected"
               else "went the opposite way (check the setup)")
        text = (f"# THIS BUDGET CANNOT DECIDE: the positive control {name} (expected: lower "
                f"AUC than uniform) {how} ({_ci(diff)} points)")
        sd = 100 * diff["sd"]
        if auc.get("seeds_needed"):
            text += (f"; from its paired sd ({sd:.1f} points) about {auc['seeds_needed']} "
                     f"seeds would bring the 95% half-width down to its observed effect "
                     f"({100 * auc['effect']:.1f} points; ~{auc['seeds_needed_80']} "
                     "seeds for 80% power)")
        elif auc.get("effect") is not None:
            text += f"; its effect ({100 * auc['effect']:.1f} points) needs > 1000 seeds"
        if auc.get("seeds_for_target"):
            text += (f"; about {auc['seeds_for_target']} seeds for a half-width of "
                     f"{100 * auc['target_half_width']:g} points")
        lines = [text]
    final = power["final"]
    if final["status"] in ("detected", "not detected", "opposite"):
        lines.append(f"# positive control on final accuracy: {final['status']} "
                     f"({_ci(final['diff'])} points)")
    return lines


def format_table(summary: dict) -> str:
    """A markdown table of table_rows with the untrained reference, the settings, the
    censoring and power statements and the sequential stop."""
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
        lines.append(f"# uniform vs untrained: {_ci(learned)} points (t interval over "
                     f"{learned['n']} seeds; the untrained model is one fixed reference)")
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + " --- |" * len(HEADERS))
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(summary)]
    lines.append(f"# {summary['interval']}")
    lines.append(f"# {summary['censoring']}")
    lines += power_lines(summary)
    lines += registered_lines(summary["registered"]) if summary.get("registered") else []
    seq = summary.get("sequential")
    if seq:
        why = {"half-width": f"every half-width below {seq['half_width']:g} points",
               "max-seeds": f"--max-seeds {seq['max_seeds']} spent",
               "round failed": "every run of the last round failed",
               "no finished runs": "no further finished runs (--summary-only)",
               None: "not stopped yet"}[seq.get("stopped")]
        lines.append(f"# sequential: {len(seq['seeds'])} seeds ({why}); target half-width "
                     f"{seq['half_width']:g} points on AUC, at most "
                     f"{seq['max_seeds']} seeds")
    lines += [f"# {line}" for line in summary.get("fidelity", [])]
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
        label = f"{strategy} ({len(runs)} seeds)"
        if strategy == POSITIVE_CONTROL:
            label += ", positive control"
        ax2.plot(steps, [100 * v for v in values], marker="o",
                 color=colors.get(strategy), label=label)
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


def write_summary(runs, settings, out_dir: Path, untrained: dict | None = None,
                  sequential: dict | None = None, fidelity: list[str] | None = None) -> dict:
    summary = summarize(runs, settings, untrained, sequential)
    if fidelity:
        summary["fidelity"] = fidelity
    _write_json(out_dir / "summary.json", summary)
    plot_summary(summary, out_dir / "credit_ablation.png")
    (out_dir / "table.md").write_text(format_table(summary) + "\n")
    return summary


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="cpu",
                        help="preset: tiny (tests), cpu (SmolLM2 full fine-tune on 2 CPU "
                             "cores, ~11 min per run), medium / large (GPU nodes)")
    parser.add_argument("--model", default=None,
                        help="model directory or 'smollm2' (default: the config's)")
    parser.add_argument("--task", default=None,
                        help="task (default: the config's; another task drops the config's "
                             "task_kwargs unless --set task_kwargs=... is given)")
    parser.add_argument("--config", default=None,
                        help="base job YAML (default: configs/default.yaml)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help="comma-separated credit strategies (any registered name; "
                             f"default {','.join(DEFAULT_STRATEGIES)}, {POSITIVE_CONTROL} being "
                             "the positive control)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default: the budget's, 0,1,2); with "
                             "--until-half-width: the first seeds, continued by the next "
                             "integers")
    parser.add_argument("--until-half-width", type=float, default=None, metavar="H",
                        help="sequential: add one seed of every strategy at a time until every "
                             "paired 95%% interval against uniform on the held-out AUC "
                             f"has a half-width below H points (after >= {SEQUENTIAL_MIN_SEEDS} "
                             "seeds), or --max-seeds are spent")
    parser.add_argument("--max-seeds", type=int, default=None, metavar="N",
                        help="sequential: at most N seeds (needed with --until-half-width)")
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
    parser.add_argument("--fidelity", default=None, metavar="SUMMARY",
                        help="an `attnrl fidelity` summary.json (or its --out) of this task: "
                             "the table says which strategies beat their own permutation there "
                             "(the others are not recommended for the task)")
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


def sequential_seeds(first: list[int], max_seeds: int) -> list[int]:
    """The sequential seed order: `first`, then the integers after max(first), `max_seeds`
    seeds in all."""
    if len(first) > max_seeds:
        raise UserError(f"--max-seeds {max_seeds} is below the {len(first)} seeds given by "
                        "--seeds (or the budget); raise it or give fewer seeds")
    nxt = max(first) + 1
    return [*first, *range(nxt, nxt + max_seeds - len(first))]


def check_sequential(args, strategies) -> None:
    """--until-half-width and --max-seeds come together, with uniform and another arm."""
    half, most = getattr(args, "until_half_width", None), getattr(args, "max_seeds", None)
    if half is None and most is None:
        return
    if half is None or most is None:
        raise UserError("--until-half-width H and --max-seeds N go together (e.g. "
                        "--until-half-width 5 --max-seeds 10)")
    if not (math.isfinite(half) and half > 0):
        raise UserError(f"--until-half-width must be a number of points > 0, got {half}")
    if most < SEQUENTIAL_MIN_SEEDS:
        raise UserError(f"--max-seeds must be >= {SEQUENTIAL_MIN_SEEDS} (the rule stops no "
                        f"earlier), got {most}")
    if BASELINE not in strategies or len(strategies) < 2:
        raise UserError(f"--until-half-width needs {BASELINE} and at least one other strategy "
                        "in --strategies (it narrows the intervals against uniform)")


def build(args) -> tuple[list[dict], dict, Path, dict]:
    """(runs, settings, out_dir, untrained run) from parsed arguments; validates before
    anything runs. With --until-half-width the runs cover --max-seeds seeds, seed-major."""
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
                "eval_before", "eval_after", "eval_every", "reasoning_vector"):
        base.pop(key, None)  # set per run (or not used by the ablation)
    if base.get("model") not in (None, "smollm2"):
        base["model"] = str(Path(base["model"]).resolve())
    from trainers import machine

    # the device every run will use, chosen as `attnrl train` chooses it (recorded, so an
    # ablation resumes only on the kind of machine it started on)
    base.update(machine.choose(base)[0])
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    check_strategies(strategies)
    check_sequential(args, strategies)
    seeds = parse_seeds(args.seeds) if args.seeds else list(budget["seeds"])
    if getattr(args, "max_seeds", None) is not None:
        seeds = sequential_seeds(seeds, args.max_seeds)
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
    settings = {"ablation_format": ABLATION_FORMAT,
                "budget": args.budget, "model": base.get("model", "smollm2"),
                "task": base.get("task", "chain_sum"), "task_seed": base.get("task_seed", 0),
                "heldout_seed": heldout_seed(base), "base_config": base, "eval": ev,
                "target_reward": budget["target_reward"] if args.target_reward is None
                else args.target_reward}
    settings["heldout"] = heldout_draw(base, ev).summary()  # refuses before any run
    if getattr(args, "fidelity", None):   # read now: a bad path is refused before any run
        from attnrl.fidelity.advice import fidelity_notes

        args.fidelity_notes = fidelity_notes(args.fidelity, strategies, settings["task"])
    runs = plan(base, ev, strategies, seeds, out)
    return runs, settings, out, base_run(base, ev, out)


def run(args) -> int:
    """Run (or, --summary-only, only summarise) the ablation seed by seed: every strategy of
    a seed is one round. With --until-half-width, stop_rule decides after each round
    whether to go on; a re-run replays the rounds on the finished runs and so reaches the
    same decision."""
    runs, settings, out, untrained = build(args)
    record_settings(out, settings, write=not args.summary_only)
    notes = getattr(args, "fidelity_notes", None)
    for line in notes or []:
        print(f"# {line}", flush=True)
    sequential = None
    if getattr(args, "until_half_width", None) is not None:
        sequential = {"half_width": args.until_half_width, "max_seeds": args.max_seeds,
                      "min_seeds": SEQUENTIAL_MIN_SEEDS, "seeds": [], "stopped": None,
                      "half_widths": {}}
    failed = []
    if not args.summary_only:
        failed += _execute_all([untrained], 0, len(runs), args)
    rounds = {}
    for item in runs:
        rounds.setdefault(item["seed"], []).append(item)
    done = []
    for k, (seed, group) in enumerate(rounds.items(), start=1):
        if sequential is None:
            if not args.summary_only:
                failed += _execute_all(group, len(done) + 1, len(runs), args,
                                       lambda: write_summary(runs, settings, out, untrained,
                                                             fidelity=notes))
            done += group
            continue
        if args.summary_only and not any(run_status(r) == "done" for r in group):
            sequential["stopped"] = "no finished runs"
            break
        failures = []
        if not args.summary_only:
            so_far = [*done, *group]
            failures = _execute_all(group, len(done) + 1, len(runs), args,
                                    lambda so_far=so_far: write_summary(
                                        so_far, settings, out, untrained, sequential, notes))
            failed += failures
        done += group
        sequential["seeds"].append(seed)
        summary = summarize(done, settings, untrained, sequential)
        sequential["half_widths"] = {
            r["strategy"]: None if r["diff_auc"]["half_width"] is None
            else 100 * r["diff_auc"]["half_width"]
            for r in summary["table"] if r["strategy"] != BASELINE}
        widths = ", ".join(f"{name} {'-' if w is None else format(w, '.1f')}"
                           for name, w in sequential["half_widths"].items())
        print(f"# after seed {seed} ({k} seeds): half-widths on AUC vs uniform "
              f"(points): {widths}; target < {sequential['half_width']:g}", flush=True)
        reason = stop_rule(summary, sequential["half_width"], sequential["max_seeds"], k)
        if reason is None and failures and len(failures) == len(group):
            reason = "round failed"
        if reason is not None:
            sequential["stopped"] = reason
            print(f"# sequential: stop ({reason})", flush=True)
            break
    summary = write_summary(done, settings, out, untrained, sequential, notes)
    print(f"# wrote {out / 'summary.json'}, {out / 'credit_ablation.png'}")
    if failed:
        print(f"# failed runs: {', '.join(failed)} (re-run the same command to retry)")
    print(format_table(summary))
    return 1 if failed else 0


def _execute_all(items, first_index: int, total: int, args, after=None) -> list[str]:
    """Run the unfinished `items` one after another (finished ones are skipped); `after()`
    once after each run that succeeded. Returns the names of the failed runs."""
    failed = []
    for i, item in enumerate(items, start=first_index):
        name = "untrained" if item["seed"] is None else run_name(item["strategy"], item["seed"])
        status = run_status(item)
        if status == "done":
            print(f"[{i}/{total}] skip {name}: finished (eval.json exists)", flush=True)
            continue
        what = "evaluating" if status == "evaluate" else "training + evaluating"
        print(f"[{i}/{total}] {time.strftime('%H:%M:%S')} {name}: {what} "
              f"(log: {item['dir'] / 'log.txt'})", flush=True)
        start = time.perf_counter()
        code = execute(item, keep_checkpoints=args.keep_checkpoints)
        if code != 0:
            failed.append(name)
            print(f"    {name} FAILED (exit {code}); see {item['dir'] / 'log.txt'}",
                  flush=True)
            continue
        print(f"    {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        if after is not None:
            after()
    return failed


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
