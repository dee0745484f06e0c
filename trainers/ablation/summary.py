"""summary.json from finished runs: per-run final accuracy, curve area and steps to
target; per strategy the paired differences to uniform, the positive control's power
statement, verdicts and the registered tests (trainers/ablation/registered.py)."""

from __future__ import annotations

from trainers.ablation.constants import (
    BASELINE,
    CENSORING_TEXT,
    DEFAULT_TARGET_HALF_WIDTH,
    INTERVAL_TEXT,
    METRIC_TEXT,
    POSITIVE_CONTROL,
    POSITIVE_CONTROL_LABEL,
    PRIMARY_METRIC,
)
from trainers.ablation.registered import predicted_control_diff, registered
from trainers.ablation.runs import read_curve, read_heldout, read_rewards, run_status
from trainers.ablation.stats import (
    censored_steps,
    control_verdict,
    curve_area,
    mean_or_none,
    paired_steps,
    paired_t_interval,
    power_check,
    sample_sd,
    steps_to_target,
    verdict,
)


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
        curves[strategy] = {"steps": steps, "mean": [mean_or_none(v) for v in per_step],
                            "std": [sample_sd(v) for v in per_step],
                            "seeds": [len(v) for v in per_step]}
        finished = [e for e in entries if e["strategy"] == strategy and e["heldout"]]
        row = {"strategy": strategy, "seeds_done": [e["seed"] for e in finished],
               "positive_control": strategy == POSITIVE_CONTROL,
               "accuracy": [metric(e, "final") for e in finished],
               "auc": [e["auc"] for e in finished],
               "steps_to_target": [e["steps_to_target"] for e in finished],
               "pass@1": mean_or_none([e["heldout"]["pass_at_k"]["1"] for e in finished]),
               f"pass@{n}": mean_or_none([e["heldout"]["pass_at_k"][str(n)] for e in finished])}
        row["mean"] = mean_or_none(row["accuracy"])
        row["std"] = sample_sd(row["accuracy"])
        row["auc_mean"] = mean_or_none([v for v in row["auc"] if v is not None])
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
    if tests["interim"]:  # no verdict before the planned seed count (the plan's rule)
        done = tests["done_seeds"]
        for row in table:
            if row["strategy"] != BASELINE:
                row["verdict"] = f"INTERIM ({done} of {tests['planned_seeds']} seeds): no verdict"
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
