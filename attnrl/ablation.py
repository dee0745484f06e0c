"""Credit ablation (`attnrl ablate`): one GRPO job under several credit strategies and
seeds, then held-out evaluation, reward curves and an accuracy table.

Every run of a seed shares that seed's data order, rollout sampling seeds and step budget;
runs differ only in `credit` (and `credit_seed`, which is the seed). Runs execute one
after another, each in its own process, in seed-major order (all strategies of seed 0
first), so a cut-off ablation still covers every strategy. Re-running the same command
skips finished runs and resumes a half-finished one from its last checkpoint.

Layout of the output directory:
    ablation.json                  the shared settings (a re-run must match them)
    runs/<strategy>-seed<k>/       trainer output_dir: metrics.jsonl, final/, wandb/,
                                   log.txt, train_done.json, eval.json
    summary.json, credit_ablation.png
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from attnrl.errors import UserError

DEFAULT_STRATEGIES = ("uniform", "random", "entropy", "local_chunk", "global_anchor",
                      "coupled")
BASELINE = "uniform"
HELDOUT_SEED_OFFSET = 10_000
PRIMARY_METRIC = "greedy_accuracy"
NOISE_RULE = ("a difference to uniform is within seed noise when |mean diff| < 2 x SE, "
              "SE = sqrt(s_a^2/n_a + s_u^2/n_u) with s the sample std over seeds, or when the "
              "two strategies' seed ranges [min, max] overlap; with fewer than 2 seeds on "
              "either side the noise is unknown")

# Budget presets: config overrides of the training job, evaluation settings, seeds.
# tiny: tests (a random tiny model; a format reward gives every group a reward spread).
# small: SmolLM2 + LoRA on 2 shared CPU cores: ~30-45 s per step, ~5 min per run with
#   its evaluation (18 runs in ~1.5-2 h).
# medium / large: GPU nodes.
BUDGETS = {
    "tiny": {
        "train": {"task_size": 8, "max_steps": 2, "save_steps": 1, "num_generations": 2,
                  "per_device_train_batch_size": 4, "max_completion_length": 8,
                  "rollout_engine": "hf", "report_to": "none", "learning_rate": 1e-3,
                  "signal_h_lo": 2, "signal_h_hi": 8, "signal_window": 4,
                  "gradient_checkpointing": False, "rewards": {"format": 1.0},
                  "reward_options": {"format": {"pattern": "[A-Z]"}}, "instruction": ""},
        "eval": {"num_problems": 3, "n": 2, "max_tokens": 8, "engine": "hf"},
        "seeds": [0],
    },
    "small": {
        "train": {"task_size": 64, "max_steps": 6, "save_steps": 3, "save_total_limit": 1,
                  "num_generations": 4, "per_device_train_batch_size": 8,
                  "max_completion_length": 40, "rollout_engine": "vllm",
                  "lora": {"r": 8, "lora_alpha": 16}, "learning_rate": 1e-4,
                  "report_to": ["wandb"], "instruction": None},  # None: the '####' one
        "eval": {"num_problems": 32, "n": 4, "max_tokens": 40, "engine": "vllm"},
        "seeds": [0, 1, 2],
    },
    "medium": {
        "train": {"task_size": 2048, "max_steps": 200, "save_steps": 50,
                  "save_total_limit": 1, "num_generations": 8,
                  "per_device_train_batch_size": 64, "max_completion_length": 256,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 256, "n": 8, "max_tokens": 256, "engine": "vllm"},
        "seeds": [0, 1, 2],
    },
    "large": {
        "train": {"task_size": 8192, "max_steps": 1000, "save_steps": 100,
                  "save_total_limit": 1, "num_generations": 16,
                  "per_device_train_batch_size": 128, "max_completion_length": 512,
                  "rollout_engine": "vllm", "learning_rate": 1e-6, "use_cpu": False,
                  "bf16": True, "dtype": "bfloat16", "report_to": ["wandb"]},
        "eval": {"num_problems": 1024, "n": 16, "max_tokens": 512, "engine": "vllm"},
        "seeds": [0, 1, 2],
    },
}
EVAL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}  # those of `attnrl eval`


# ---------------------------------------------------------------------------- planning

def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def plan(base_config: dict, eval_settings: dict, strategies, seeds, out_dir) -> list[dict]:
    """One entry per (seed, strategy), seed-major: {'strategy', 'seed', 'dir', 'config'}.
    The config is the base with credit / seed / output_dir / run_name set."""
    from trainers.job import validate_config

    runs = []
    for seed in seeds:
        for strategy in strategies:
            run_dir = Path(out_dir) / "runs" / run_name(strategy, seed)
            config = {**base_config, "credit": strategy, "seed": int(seed),
                      "credit_seed": int(seed), "output_dir": str(run_dir),
                      "run_name": f"{Path(out_dir).name}-{run_name(strategy, seed)}",
                      "resume": "auto"}
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
        proc = subprocess.run([sys.executable, "-m", "attnrl.ablation", str(run["dir"])],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                              check=False)
    return proc.returncode


def _worker(run_dir: Path) -> None:
    """Child process: train unless train_done.json exists (or the spec says no training:
    the untrained model), then evaluate."""
    spec = json.loads((run_dir / "run.json").read_text())
    config = spec["config"]
    train = spec.get("train", True)
    if train and not (run_dir / "train_done.json").exists():
        from trainers.cli import run_job

        start = time.perf_counter()
        run_job(config)
        _write_json(run_dir / "train_done.json",
                    {"seconds": time.perf_counter() - start, "final": str(run_dir / "final")})
        if not spec.get("keep_checkpoints"):
            for ckpt in run_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    if train:
        model_dir = final_model_dir(run_dir, config)
    else:
        from attnrl.models import resolve_model

        model_dir = resolve_model(config.get("model", "smollm2"))
    result = evaluate_run(model_dir, config, spec["eval"])
    _write_json(run_dir / "eval.json", result)
    if model_dir.name == "final_merged" and not spec.get("keep_checkpoints"):
        shutil.rmtree(model_dir)  # a full copy; final/ holds the adapter it came from
    print(f"eval: greedy accuracy {result['models'][0]['greedy_accuracy']:.3f}", flush=True)


def final_model_dir(run_dir: Path, config: dict) -> Path:
    """The trained model as a full HF directory: final/, or a merged copy of a LoRA
    adapter saved there (final_merged/)."""
    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        return final
    merged = run_dir / "final_merged"
    if (merged / "config.json").exists():
        return merged
    import torch
    from peft import PeftModel

    from attnrl.models import load_model, load_tokenizer, resolve_model

    base_dir = resolve_model(config.get("model", "smollm2"))
    model = PeftModel.from_pretrained(load_model(base_dir, dtype=torch.float32),
                                      str(final)).merge_and_unload()
    tmp = run_dir / "final_merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(base_dir).save_pretrained(tmp)
    tmp.rename(merged)
    return merged


def heldout_seed(config: dict) -> int:
    return int(config.get("task_seed", 0)) + HELDOUT_SEED_OFFSET


def evaluate_run(model_dir: Path, config: dict, settings: dict) -> dict:
    """`attnrl eval` of one checkpoint on the held-out split (same task and task kwargs,
    task seed + HELDOUT_SEED_OFFSET), prompts formatted as in training, greedy included."""
    from attnrl.data import DEFAULT_INSTRUCTION
    from attnrl.evaluation import evaluate

    instruction = config.get("instruction")
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


def noise_verdict(values: list[float], base: list[float]) -> dict:
    """Difference of mean `values` to mean `base` (per-seed accuracies), its standard
    error and whether it is within seed noise (see NOISE_RULE)."""
    diff = _mean(values) - _mean(base)
    if len(values) < 2 or len(base) < 2:
        return {"diff": diff, "se": None, "within_noise": None,
                "verdict": "noise unknown (<2 seeds)"}
    se = math.sqrt(_std(values) ** 2 / len(values) + _std(base) ** 2 / len(base))
    overlap = min(values) <= max(base) and min(base) <= max(values)
    within = abs(diff) < 2 * se or overlap
    return {"diff": diff, "se": se, "within_noise": within, "ranges_overlap": overlap,
            "verdict": "within seed noise" if within else "beyond seed noise"}


def read_heldout(run_dir: Path) -> dict:
    model = json.loads((run_dir / "eval.json").read_text())["models"][0]
    return {"greedy_accuracy": model["greedy_accuracy"], "pass_at_k": model["pass_at_k"],
            "mean_reward": model["mean_reward"]}


def summarize(runs: list[dict], settings: dict, untrained: dict | None = None) -> dict:
    """summary.json content from the runs' metrics.jsonl and eval.json files (and the
    untrained model's eval.json when `untrained`, a base_run, has one)."""
    entries = []
    for run in runs:
        steps, rewards = read_rewards(run["dir"] / "metrics.jsonl")
        entry = {"strategy": run["strategy"], "seed": run["seed"], "status": run_status(run),
                 "dir": str(run["dir"]), "steps": steps, "rewards": rewards, "heldout": None}
        if entry["status"] == "done":
            entry["heldout"] = read_heldout(run["dir"])
        entries.append(entry)
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    n = settings["eval"]["n"]
    curves, table = {}, []
    for strategy in strategies:
        mine = [e for e in entries if e["strategy"] == strategy and e["steps"]]
        steps = sorted({s for e in mine for s in e["steps"]})
        per_step = [[e["rewards"][e["steps"].index(s)] for e in mine if s in e["steps"]]
                    for s in steps]
        curves[strategy] = {"steps": steps, "mean": [_mean(v) for v in per_step],
                            "std": [_std(v) for v in per_step],
                            "min": [min(v) for v in per_step], "max": [max(v) for v in per_step],
                            "seeds": [len(v) for v in per_step]}
        done = [e for e in entries if e["strategy"] == strategy and e["heldout"]]
        acc = [e["heldout"][PRIMARY_METRIC] for e in done]
        row = {"strategy": strategy, "seeds_done": [e["seed"] for e in done],
               "accuracy": acc, "mean": _mean(acc), "std": _std(acc),
               "min": min(acc) if acc else None, "max": max(acc) if acc else None,
               "pass@1": _mean([e["heldout"]["pass_at_k"]["1"] for e in done]),
               f"pass@{n}": _mean([e["heldout"]["pass_at_k"][str(n)] for e in done])}
        table.append(row)
    base = next((r for r in table if r["strategy"] == BASELINE), None)
    for row in table:
        if base is None or not base["accuracy"] or not row["accuracy"]:
            row.update(diff=None, se=None, within_noise=None, verdict="no data")
        elif row is base:
            row.update(diff=0.0, se=None, within_noise=None, verdict="baseline")
        else:
            row.update(noise_verdict(row["accuracy"], base["accuracy"]))
        # paired by seed (same data order): the spread of the difference across seeds
        base_by_seed = dict(zip(base["seeds_done"], base["accuracy"])) if base else {}
        paired = [a - base_by_seed[s] for s, a in zip(row["seeds_done"], row["accuracy"])
                  if s in base_by_seed]
        row["diff_per_seed"] = paired
        row["diff_std"] = _std(paired)
    reference = None
    if untrained is not None and run_status(untrained) == "done":
        reference = read_heldout(untrained["dir"])
    return {"settings": settings, "metric": PRIMARY_METRIC, "baseline": BASELINE,
            "noise_rule": NOISE_RULE, "untrained": reference, "runs": entries,
            "curves": curves, "table": table}


def format_table(summary: dict) -> str:
    """The held-out accuracy table (percent) and a plain verdict line."""
    n = summary["settings"]["eval"]["n"]
    ev = summary["settings"]["eval"]
    head = (f"{'strategy':<16}{'seeds':>6}{'greedy %':>10}{'± std':>7}{'range':>13}"
            f"{'pass@1':>8}{f'pass@{n}':>8}{'diff vs uniform':>17}{'diff sd':>9}{'SE':>6}"
            "  verdict")
    title = (f"# held-out {summary['settings']['task']} (task seed "
             f"{summary['settings']['heldout_seed']}): {ev['num_problems']} problems, greedy + "
             f"{n} samples at T={ev['temperature']}; values in percent")
    lines = [title, head, "-" * len(head)]

    def pct(value, fmt=".1f"):
        return "-" if value is None else format(100 * value, fmt)

    ref = summary.get("untrained")
    if ref is not None:
        lines.insert(1, f"# untrained model: greedy {pct(ref['greedy_accuracy'])}, pass@1 "
                        f"{pct(ref['pass_at_k']['1'])}, pass@{n} {pct(ref['pass_at_k'][str(n)])}")

    for row in summary["table"]:
        rng = "-" if row["min"] is None else f"{pct(row['min'])}-{pct(row['max'])}"
        diff = "-" if row["diff"] is None else f"{100 * row['diff']:+.1f}"
        lines.append(f"{row['strategy']:<16}{len(row['accuracy']):>6}{pct(row['mean']):>10}"
                     f"{pct(row['std']):>7}{rng:>13}{pct(row['pass@1']):>8}"
                     f"{pct(row[f'pass@{n}']):>8}{diff:>17}{pct(row.get('diff_std')):>9}"
                     f"{pct(row['se']):>6}  {row['verdict']}")
    compared = [r for r in summary["table"] if r["within_noise"] is not None]
    beyond = [r["strategy"] for r in compared if not r["within_noise"]]
    if not compared:
        verdict = "no strategy has >= 2 finished seeds next to uniform: seed noise is unknown"
    elif not beyond:
        verdict = "all differences to uniform are within seed noise"
    else:
        verdict = f"beyond seed noise: {', '.join(beyond)}; the rest are within it"
    lines.append(f"# {verdict} ({NOISE_RULE})")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path) -> Path:
    """Reward curves (mean ± std over seeds) per strategy above the accuracy table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tab) = plt.subplots(2, 1, figsize=(9, 7.5), dpi=110,
                                  gridspec_kw={"height_ratios": [3, 2]})
    for strategy, curve in summary["curves"].items():
        if not curve["steps"]:
            continue
        mean, std = curve["mean"], curve["std"]
        line, = ax.plot(curve["steps"], mean, marker="o", markersize=3,
                        label=f"{strategy} ({max(curve['seeds'])} seeds)")
        ax.fill_between(curve["steps"], [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training reward (mean ± std over seeds)")
    settings = summary["settings"]
    ax.set_title(f"credit ablation: {Path(str(settings['model'])).name} on {settings['task']} "
                 f"({settings['budget']} budget)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    n = settings["eval"]["n"]
    cells = []
    for row in summary["table"]:
        def pct(value):
            return "-" if value is None else f"{100 * value:.1f}"
        cells.append([row["strategy"], str(len(row["accuracy"])),
                      f"{pct(row['mean'])} ± {pct(row['std'])}", pct(row["pass@1"]),
                      pct(row[f"pass@{n}"]),
                      "-" if row["diff"] is None else f"{100 * row['diff']:+.1f}",
                      pct(row.get("diff_std")), pct(row["se"]), row["verdict"]])
    ref = summary.get("untrained")
    if ref is not None:
        cells.append(["untrained", "-", f"{100 * ref['greedy_accuracy']:.1f}",
                      f"{100 * ref['pass_at_k']['1']:.1f}",
                      f"{100 * ref['pass_at_k'][str(n)]:.1f}", "-", "-", "-", "reference"])
    tab.axis("off")
    table = tab.table(cellText=cells, loc="center", cellLoc="center",
                      colLabels=["strategy", "seeds", "greedy % ± std", "pass@1",
                                 f"pass@{n}", "diff vs uniform", "diff sd", "SE",
                                 "verdict"])
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(cells[0]))))
    table.scale(1, 1.3)
    tab.set_title("held-out accuracy (percent)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_summary(runs, settings, out_dir: Path, untrained: dict | None = None) -> dict:
    summary = summarize(runs, settings, untrained)
    _write_json(out_dir / "summary.json", summary)
    plot_summary(summary, out_dir / "credit_ablation.png")
    return summary


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                        help="preset: tiny (tests), small (2 CPU cores, ~1.5 h), "
                             "medium / large (GPU nodes)")
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
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results/credit_ablation_BUDGET)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep checkpoint-* dirs and the merged LoRA copy of finished "
                             "runs (default: delete them; final/ is kept)")
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
    for key in ("credit", "seed", "credit_seed", "output_dir", "run_name"):
        base.pop(key, None)  # set per run
    if base.get("model") not in (None, "smollm2"):
        base["model"] = str(Path(base["model"]).resolve())
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    check_strategies(strategies)
    seeds = parse_seeds(args.seeds) if args.seeds else list(budget["seeds"])
    ev = {**EVAL_DEFAULTS, **budget["eval"]}
    for key, value in (("num_problems", args.eval_problems), ("n", args.eval_n),
                       ("max_tokens", args.eval_max_tokens)):
        if value is not None:
            ev[key] = value
    if ev["num_problems"] < 1 or ev["n"] < 1 or ev["max_tokens"] < 1:
        raise UserError("--eval-problems, --eval-n and --eval-max-tokens must be >= 1")
    out = Path(args.out or f"benchmarks/results/credit_ablation_{args.budget}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    settings = {"budget": args.budget, "model": base.get("model", "smollm2"),
                "task": base.get("task", "chain_sum"), "task_seed": base.get("task_seed", 0),
                "heldout_seed": heldout_seed(base), "base_config": base, "eval": ev}
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
