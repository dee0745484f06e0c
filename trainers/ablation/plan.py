"""Planning an ablation from the command line: the runs (seed-major, one config per
strategy and seed, variants such as the half-learning-rate control applied), the checks on
strategies, seeds and the sequential options, and ablation.json (a resumed ablation must
have the same settings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from attnrl.atomic import write_json
from attnrl.errors import UserError
from trainers.ablation.constants import (
    ABLATION_FORMAT,
    BASELINE,
    BUDGETS,
    EVAL_DEFAULTS,
    SEQUENTIAL_MIN_SEEDS,
    flatten_settings,
)
from trainers.ablation.reference import heldout_draw, heldout_seed
from trainers.ablation.registered import VARIANTS
from trainers.ablation.runs import base_run, run_name


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
    if BASELINE not in strategies:
        raise UserError(f"--strategies {','.join(strategies)} has no {BASELINE}: every "
                        f"comparison of the ablation is against {BASELINE} (and the untrained "
                        f"model); add {BASELINE}")


def record_settings(out_dir: Path, settings: dict, write: bool = True) -> None:
    """Write ablation.json (if `write`), or check that an existing one holds the same
    settings."""
    path = out_dir / "ablation.json"
    if path.exists():
        old = json.loads(path.read_text())
        flat_old, flat_new = flatten_settings(old), flatten_settings(settings)
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
    write_json(path, settings)


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
