"""Credit ablation (`attnrl ablate`): one GRPO job under several credit strategies and
seeds, a held-out learning curve per run, and a table of paired differences to uniform.

The package, in the order a run flows through it:
    constants.py   strategies, baseline, positive control, budget presets
    plan.py        the runs of an ablation from the command line; ablation.json
    reference.py   the held-out problems and the untrained reference's evaluation
    runs.py        one run in a child process (`python -m trainers.ablation RUN_DIR`)
    stats.py       intervals over seeds, power, verdicts, the sequential rule
    registered.py  the registered tests: primary, Holm secondary, the predicted control
    summary.py     summary.json from finished runs
    report.py      table.md and credit_ablation.png
    workers.py     --workers N: disjoint CPU cores or GPUs per run in parallel
    cli.py         `attnrl ablate` options and driver

Every run of a seed shares that seed's data order, rollout sampling seeds and step budget;
runs differ only in `credit` (and `credit_seed`, which is the seed). Runs execute each in
its own process, in seed-major order (all strategies of seed 0 first), so a cut-off
ablation still covers every strategy; `--workers N` runs N at a time, each pinned to its
own cores or GPUs (workers.py), with the same numbers. Re-running the same command skips
finished runs and resumes a half-finished one from its last checkpoint.

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

The registered tests (registered.py, stated under the table): the primary test
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

from attnrl.analysis.stats import T975, t975
from trainers.ablation.cli import add_arguments, run
from trainers.ablation.constants import (
    BASELINE,
    BUDGETS,
    DEFAULT_STRATEGIES,
    POSITIVE_CONTROL,
    SEQUENTIAL_MIN_SEEDS,
)
from trainers.ablation.plan import (
    build,
    check_sequential,
    check_strategies,
    plan,
    record_settings,
    sequential_seeds,
)
from trainers.ablation.reference import heldout_draw, heldout_seed, reference_eval_args
from trainers.ablation.report import format_table, write_summary
from trainers.ablation.runs import execute, run_name, run_status
from trainers.ablation.stats import (
    Z80,
    censored_steps,
    curve_area,
    paired_steps,
    paired_t_interval,
    power_check,
    seeds_needed,
    steps_to_target,
    stop_rule,
)
from trainers.ablation.summary import summarize

__all__ = [
    "BASELINE",
    "BUDGETS",
    "DEFAULT_STRATEGIES",
    "POSITIVE_CONTROL",
    "SEQUENTIAL_MIN_SEEDS",
    "T975",
    "Z80",
    "add_arguments",
    "build",
    "censored_steps",
    "check_sequential",
    "check_strategies",
    "curve_area",
    "execute",
    "format_table",
    "heldout_draw",
    "heldout_seed",
    "paired_steps",
    "paired_t_interval",
    "plan",
    "power_check",
    "record_settings",
    "reference_eval_args",
    "run",
    "run_name",
    "run_status",
    "seeds_needed",
    "sequential_seeds",
    "steps_to_target",
    "stop_rule",
    "summarize",
    "t975",
    "write_summary",
]
