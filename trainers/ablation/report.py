"""The ablation's table (table.md, printed) and figure (credit_ablation.png) from a
summary, and writing all three."""

from __future__ import annotations

from pathlib import Path

from attnrl.atomic import write_json
from trainers.ablation.constants import (
    BASELINE,
    POSITIVE_CONTROL,
    POSITIVE_CONTROL_LABEL,
    SMOOTH_WINDOW,
)
from trainers.ablation.registered import registered_lines
from trainers.ablation.stats import mean_or_none
from trainers.ablation.summary import summarize


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
    if summary["registered"]["interim"]:
        diff = auc.get("diff") or {}
        if diff.get("low") is None:
            return []
        return [(f"# positive control {name} so far: {_ci(diff)} points on AUC (INTERIM: "
                 "whether this budget can decide is judged at the planned seeds)")]
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
            values.append(mean_or_none(vals))
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
    write_json(out_dir / "summary.json", summary)
    plot_summary(summary, out_dir / "credit_ablation.png")
    (out_dir / "table.md").write_text(format_table(summary) + "\n")
    return summary
