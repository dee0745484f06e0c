"""`attnrl ablate` / benchmarks/credit_ablation.py: the options and the driver that runs the
plan seed by seed (sequentially with --until-half-width) and writes the summary after every
finished run."""

from __future__ import annotations

from trainers.ablation.constants import (
    BASELINE,
    BUDGETS,
    DEFAULT_STRATEGIES,
    POSITIVE_CONTROL,
    SEQUENTIAL_MIN_SEEDS,
)
from trainers.ablation.plan import build, record_settings
from trainers.ablation.report import format_table, write_summary
from trainers.ablation.runs import execute_all, run_status
from trainers.ablation.stats import stop_rule
from trainers.ablation.summary import summarize
from trainers.ablation.workers import idle_core_hint, worker_slots


def add_arguments(parser) -> None:
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="cpu",
                        help="preset: tiny (tests), cpu (SmolLM2 full fine-tune on 2 CPU "
                             "cores, ~15 min per run, two at a time with --workers 2), medium / "
                             "large (GPU nodes)")
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
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="runs at the same time, each pinned to its own share of the CPU "
                             "cores (or, where GPUs are visible, a GPU of its own); a run's "
                             "numbers do not depend on N (default 1)")
    parser.add_argument("--summary-only", action="store_true",
                        help="rebuild summary.json and the PNG from finished runs; train nothing")


def run(args) -> int:
    """Run (or, --summary-only, only summarise) the ablation seed by seed: every strategy of
    a seed is one round. With --until-half-width, stop_rule decides after each round
    whether to go on; a re-run replays the rounds on the finished runs and so reaches the
    same decision."""
    slots = worker_slots(getattr(args, "workers", 1))
    runs, settings, out, untrained = build(args)
    hint = None if args.summary_only else idle_core_hint(getattr(args, "workers", 1))
    if hint:
        print(hint, flush=True)
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
        failed += execute_all([untrained], 0, len(runs), args, slots=slots)
    rounds = {}
    for item in runs:
        rounds.setdefault(item["seed"], []).append(item)
    done = []
    if sequential is None:  # every run in seed-major order, as many at once as workers
        if not args.summary_only:
            failed += execute_all(runs, 1, len(runs), args,
                                  lambda: write_summary(runs, settings, out, untrained,
                                                        fidelity=notes), slots=slots)
        done, rounds = list(runs), {}
    for k, (seed, group) in enumerate(rounds.items(), start=1):
        if args.summary_only and not any(run_status(r) == "done" for r in group):
            sequential["stopped"] = "no finished runs"
            break
        failures = []
        if not args.summary_only:
            so_far = [*done, *group]
            failures = execute_all(group, len(done) + 1, len(runs), args,
                                    lambda so_far=so_far: write_summary(
                                        so_far, settings, out, untrained, sequential, notes),
                                    slots=slots)
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
