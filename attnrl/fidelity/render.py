"""The table and the picture of `attnrl fidelity` (from the summary and records of
attnrl.fidelity.report)."""

from __future__ import annotations

import math

import numpy as np

from attnrl.fidelity.report import CEILING, CONTROLS, ORACLE, SPLIT


def _ci(entry: dict | None, fmt: str = ".3f") -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    if entry.get("low") is None:
        return f"{entry['mean']:{fmt}}"
    return f"{entry['mean']:{fmt}} [{entry['low']:{fmt}}, {entry['high']:{fmt}}]"


def _p(entry: dict | None) -> str:
    if not entry or entry.get("p_holm") is None or not math.isfinite(entry["p_holm"]):
        return "-"
    return f"{entry['p_holm']:.3g}"


def table_rows(summary: dict) -> list[list[str]]:
    """Rows of the table (strategies by mean S, the oracle first)."""
    table = summary["strategies"]
    names = sorted((n for n in table if table[n].get("measured")),
                   key=lambda n: (n not in CONTROLS, -table[n]["S"]["mean"]))
    labels = {CEILING: f"{CEILING} (control: best any gamma can do)",
              ORACLE: f"{ORACLE} (control: gamma proportional to abs D)",
              SPLIT: f"{SPLIT} (positive control: gamma from half the continuations, "
                     "scored on the other half; p unadjusted)"}
    rows = []
    for name in names:
        e = table[name]
        control = name in CONTROLS
        shown = name == SPLIT or not control
        split_p = e.get("S_vs_perm", {}).get("p")
        rows.append([labels.get(name, name), _ci(e["S"]), _ci(e["rho"]),
                     _ci(e.get("S_vs_perm"), "+.3f") if shown else "-",
                     (f"{split_p:.3g}" if name == SPLIT and split_p is not None
                      else _p(e.get("S_vs_perm"))),
                     "-" if control else _ci(e.get("S_vs_position"), "+.3f"),
                     _p(e.get("S_vs_position")),
                     "-" if control else _ci(e.get("S_vs_random"), "+.3f"),
                     _p(e.get("S_vs_random")), e.get("verdict", "control" if control or
                                                      name == "uniform" else "-")])
    for name in table:
        if not table[name].get("measured"):
            rows.append([name, "not measured: " + table[name].get("reason", "")]
                        + [""] * (len(HEADER) - 2))
    return rows


HEADER = ["strategy", "S [95% CI]", "rho [95% CI]", "S - permuted", "Holm p",
          "S - position profile", "Holm p", "S - random", "Holm p", "verdict"]


def format_table(summary: dict) -> str:
    """Markdown table plus the counts and controls."""
    s = summary["settings"]
    lines = [(f"# fidelity: {s['model']} on {s['task']}: {summary['responses']} responses "
              f"({summary['accuracy']:.0%} correct) of {s['problems']} problems, "
              f"<= {s['max_chunks']} chunks, {s['continuations']} continuations per prefix; "
              f"{summary['set_aside_all_D_zero']} set aside (all D = 0), "
              f"{summary['kept']} kept over {summary['problems_kept']} problems"),
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    c = summary["controls"]
    lines.append(f"positive control (credit from half the continuations, scored on the other "
                 f"half) detected: {c['split_control_detected']}")
    lines.append(f"controls: uniform S = 1 exactly: {c['uniform_S_is_1']}; ceiling above every "
                 f"strategy: {c['ceiling_on_top']}; gamma ~ |D| above every strategy: "
                 f"{c['proportional_above_strategies']}; {c['mc_noise']}")
    cal = c.get("null_calibration", {})
    if cal.get("redraws"):
        lines.append(
            f"null calibration on this run's D ({cal['redraws']} redraws of random credit, "
            "single tokens and runs, "
            f"nominal {cal['level']:.0%}): the permutation test rejects in "
            f"{cal['permutation']['rejection_rate']:.1%} (se {cal['permutation']['se']:.1%}), "
            f"the position test in {cal['position']['rejection_rate']:.1%} "
            f"(se {cal['position']['se']:.1%}), for one strategy's unadjusted p")
    rec, position = summary["recommended"], summary.get("position_only", [])
    lines.append("recommended on this task (beat their own permutation and their position "
                 "profile, Holm 5%): " + (", ".join(rec) if rec else "none"))
    if position:
        lines.append("beat their permutation by position only (credit where D is large on "
                     "average, not where this response's D is): " + ", ".join(position))
    return "\n".join(lines)


def plot_fidelity(rows: list[dict], summary: dict, path, strips: int = 6):
    """Left: per-response strips (|D_j| above each strategy's w_j) for the responses with the
    largest sum |D|; right: the distribution of S per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["strategies"]
    names = sorted((n for n in table if table[n].get("measured")),
                   key=lambda n: (n not in CONTROLS, -table[n]["S"]["mean"]))
    shown = sorted((r for r in rows if not r["set_aside"]),
                   key=lambda r: -sum(abs(x) for x in r["D"]))[:strips]
    fig = plt.figure(figsize=(14, 1.0 + 0.32 * (len(names) + 2) * max(1, len(shown)) / 2))
    grid = fig.add_gridspec(max(1, len(shown)), 2, width_ratios=(1.2, 1))
    for i, row in enumerate(shown):
        ax = fig.add_subplot(grid[i, 0])
        d = np.abs(np.asarray(row["D"]))
        image = [d / max(d.max(), 1e-9)]
        for name in names:
            w = np.asarray(row["strategies"].get(name, {}).get("w", [np.nan] * len(d)))
            span = np.nanmax(w) - np.nanmin(w) if np.isfinite(w).any() else 0
            image.append((w - np.nanmin(w)) / span if span > 0 else np.zeros_like(w))
        ax.imshow(np.asarray(image), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(names) + 1), ["|D|", *names], fontsize=6)
        ax.set_xticks(range(len(d)), [f"{x:+.2f}" for x in row["D"]], fontsize=6)
        ax.set_title(f"problem {row['problem']}, {'correct' if row['correct'] else 'wrong'}, "
                     f"V = {', '.join(f'{v:.2f}' for v in row['values'])}", fontsize=7)
    ax = fig.add_subplot(grid[:, 1])
    data = [[r["strategies"][n]["S"] for r in rows if not r["set_aside"]
             and "S" in r["strategies"].get(n, {})] for n in names]
    ax.boxplot(data, vert=False, showfliers=False)
    for k, values in enumerate(data, start=1):
        ax.scatter(values, k + (np.random.default_rng(k).random(len(values)) - 0.5) * 0.3,
                   s=3, alpha=0.4)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.invert_yaxis()                              # the same order as the strips' rows
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
    ax.set_xlabel("S: share of credit on decisive chunks (1 = uniform)")
    ax.set_title("per-response S (strips: |D| and chunk weights, each row scaled to [0, 1])",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
