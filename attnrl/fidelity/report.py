"""Per-response records, the summary table and the picture of `attnrl fidelity`.

Statistics: attnrl.fidelity.stats. Two rows are controls built from the very D they are
scored against (in-sample), not strategies:
- `mc_proportional`: gamma = 1 + (gamma_amp - 1) |D_j| / max_j |D_j| on chunk j's tokens,
  credit proportional to the Monte-Carlo step advantage, in the strategies' [1, gamma_amp];
- `mc_ceiling`: the largest S any gamma in [1, gamma_amp] reaches on the response: gamma_amp
  on the m chunks of largest |D_j| (the best m), 1 elsewhere. No strategy can beat it.
`uniform` must give S = 1 exactly.
"""

from __future__ import annotations

import math

import numpy as np

from attnrl.fidelity import stats
from attnrl.fidelity.values import binomial_se, step_advantages, values_of

ORACLE = "mc_proportional"
CEILING = "mc_ceiling"
CONTROLS = (CEILING, ORACLE)
BASELINE = "random"
LEVEL = 0.05


def oracle_gamma(bounds, abs_d: np.ndarray, gamma_amp: float) -> np.ndarray:
    """(T,) the Monte-Carlo control's gamma (module docstring); ones when |D| is all 0."""
    top = float(np.max(abs_d)) if len(abs_d) else 0.0
    per_chunk = 1.0 + (gamma_amp - 1.0) * (abs_d / top if top > 0 else np.zeros_like(abs_d))
    return np.repeat(per_chunk, np.diff(np.asarray(bounds)))


def ceiling_gamma(bounds, abs_d: np.ndarray, gamma_amp: float) -> np.ndarray:
    """(T,) gamma_amp on the best set of top-|D| chunks (the S-maximizing gamma in
    [1, gamma_amp]: S is K times a w-weighted mean of |D_j| / sum |D|), 1 elsewhere."""
    order = np.argsort(-abs_d, kind="stable")
    best, best_w = -math.inf, np.ones(len(abs_d))
    for m in range(1, len(abs_d) + 1):
        w = np.ones(len(abs_d))
        w[order[:m]] = gamma_amp
        value = float(stats.decisive_share(w, abs_d)) if abs_d.sum() > 0 else 1.0
        if value > best + 1e-12:
            best, best_w = value, w
    return np.repeat(best_w, np.diff(np.asarray(bounds)))


POSITION_DONORS = 20   # other problems' responses in each response's position null [D]


def response_records(cuts, gammas: dict, gamma_amp: float, permutations: int, seed: int,
                     records=None, tokenizer=None) -> list[dict]:
    """One dict per response: its cut, values, D and every strategy's gamma, w, S, rho, the
    permutation means, the position-profile mean (S_position: up to POSITION_DONORS other
    problems' responses) and S with D from half the continuations."""
    rows = []
    problems = np.array([c.problem for c in cuts])
    for r, cut in enumerate(cuts):
        d = step_advantages(cut)
        abs_d, abs_half = np.abs(d), np.abs(step_advantages(cut, half=True))
        row = {"problem": cut.problem, "response": cut.text, "correct": cut.correct,
               "tokens": len(cut.response_ids), "bounds": cut.bounds, "chunking": cut.chunking,
               "values": [round(float(v), 4) for v in values_of(cut)],
               "successes": cut.successes, "trials": cut.trials,
               "se": [round(binomial_se(s, t), 4) for s, t in zip(cut.successes, cut.trials)],
               "D": [round(float(x), 4) for x in d],
               "set_aside": not abs_d.sum() > 0, "strategies": {}}
        if records is not None:
            row["question"] = records[cut.problem].question
        rng = np.random.default_rng([int(seed), r])
        weights = {name: g[r] for name, g in gammas.items()}
        weights[ORACLE] = oracle_gamma(cut.bounds, abs_d, gamma_amp)
        weights[CEILING] = ceiling_gamma(cut.bounds, abs_d, gamma_amp)
        for name, gamma in weights.items():
            if gamma is None:
                continue
            entry = {"gamma": [round(float(x), 3) for x in gamma],
                     "w": [round(float(x), 4) for x in stats.chunk_weights(gamma, cut.bounds)]}
            if not row["set_aside"]:
                entry["S"], entry["rho"] = stats.response_scores(gamma, cut.bounds, abs_d)
                entry["S_perm"], entry["rho_perm"] = stats.permutation_means(
                    gamma, cut.bounds, abs_d, permutations, rng)
                entry["S_half"] = float(stats.decisive_share(
                    stats.chunk_weights(gamma, cut.bounds), abs_half))
                if name in gammas:
                    others = np.flatnonzero((problems != cut.problem) & np.array(
                        [g is not None for g in gammas[name]]))
                    if others.size:
                        chosen = rng.choice(others, size=min(POSITION_DONORS, others.size),
                                            replace=False)
                        entry["S_position"] = stats.position_means(
                            [gammas[name][i] for i in chosen], cut.bounds, abs_d)
            row["strategies"][name] = entry
        rows.append(row)
    return rows


def _column(rows, name, key, minus=None):
    """(values, groups) of strategy `name`'s `key` over the kept responses (minus another
    key, or another strategy's `key` when minus is ('strategy', other))."""
    values, groups = [], []
    for row in rows:
        entry = row["strategies"].get(name)
        if row["set_aside"] or entry is None or key not in entry:
            continue
        value = entry[key]
        if isinstance(minus, str):
            if minus not in entry:
                continue
            value = value - entry[minus]
        elif minus is not None:
            other = row["strategies"].get(minus[1])
            if other is None or key not in other:
                continue
            value = value - other[key]
        if value is None or not math.isfinite(value):
            continue
        values.append(value)
        groups.append(row["problem"])
    return np.asarray(values, dtype=float), np.asarray(groups)


def summarize(rows: list[dict], names: list[str], settings: dict) -> dict:
    """The summary dict: counts, per-strategy statistics with intervals over problems,
    paired differences against the permutation and against `random` (Holm-adjusted over the
    strategies compared), the controls and the recommendation."""
    kept = [r for r in rows if not r["set_aside"]]
    seed = int(settings.get("seed", 0))
    table = {}
    for name in [*names, *CONTROLS]:
        s, groups = _column(rows, name, "S")
        if s.size == 0:
            table[name] = {"measured": 0, "reason": _why_unmeasured(name, rows, settings)}
            continue
        entry = {"measured": int(s.size), "S": stats.cluster_mean(s, groups),
                 "rho": stats.cluster_mean(*_column(rows, name, "rho")),
                 "S_half": stats.cluster_mean(*_column(rows, name, "S_half")),
                 "S_vs_perm": stats.cluster_mean(*_column(rows, name, "S", "S_perm")),
                 "rho_vs_perm": stats.cluster_mean(*_column(rows, name, "rho", "rho_perm"))}
        entry["S_vs_perm"]["p"] = stats.sign_flip_p(*_column(rows, name, "S", "S_perm"),
                                                    seed=seed)
        position = _column(rows, name, "S", "S_position")
        if position[0].size:
            entry["S_vs_position"] = stats.cluster_mean(*position)
            entry["S_vs_position"]["p"] = stats.sign_flip_p(*position, seed=seed)
        if BASELINE in names and name != BASELINE:
            diff = _column(rows, name, "S", ("strategy", BASELINE))
            entry["S_vs_random"] = stats.cluster_mean(*diff)
            entry["S_vs_random"]["p"] = stats.sign_flip_p(*diff, seed=seed)
        table[name] = entry
    compared = [n for n in names if n != "uniform" and table[n].get("measured")]
    for key in ("S_vs_perm", "S_vs_random", "S_vs_position"):
        family = {n: table[n][key]["p"] for n in compared if key in table[n]}
        for name, p in stats.holm(family).items():
            table[name][key]["p_holm"] = p
    for name in compared:
        table[name]["verdict"] = _verdict(table[name])
    uniform = [e["S"] for r in kept for n, e in r["strategies"].items() if n == "uniform"]
    best = max((n for n in names if table[n].get("measured")),
               key=lambda n: table[n]["S"]["mean"], default=None)

    def above_best(control):
        return best is None or not table[control].get("measured") or \
            table[control]["S"]["mean"] >= table[best]["S"]["mean"] - 1e-12
    controls = {
        "uniform_S_is_1": bool(uniform) and all(abs(v - 1.0) < 1e-9 for v in uniform),
        "ceiling_on_top": above_best(CEILING), "proportional_above_strategies":
        above_best(ORACLE), "best_strategy": best, "mc_noise": _noise_note(table, names)}
    return {"format": 1, "settings": settings, "responses": len(rows),
            "set_aside_all_D_zero": len(rows) - len(kept), "kept": len(kept),
            "problems_kept": len({r["problem"] for r in kept}),
            "accuracy": float(np.mean([r["correct"] for r in rows])) if rows else None,
            "chunking": {how: sum(r["chunking"] == how for r in rows)
                         for how in ("sentence", "tokens")},
            "mean_chunks": float(np.mean([len(r["bounds"]) - 1 for r in rows])) if rows
            else None,
            "strategies": table, "controls": controls,
            "recommended": [n for n in compared if table[n].get("verdict") ==
                            "beats its permutation and its position profile"],
            "position_only": [n for n in compared if table[n].get("verdict", "").startswith(
                "beats its permutation (")],
            "method": ("S = sum_j w_j |D_j| / (mean_j w_j sum_j |D_j|), w_j = mean gamma on "
                       "chunk j; rho = Spearman(w, |D|); nulls: the same gamma permuted within "
                       "the response, and other problems' gamma at the same relative positions "
                       "(position profile); intervals: 95% t over problems of per-problem "
                       "means; p: sign-flip randomization over problems, Holm over the "
                       "strategies compared (uniform and the MC controls excluded)")}


def _why_unmeasured(name: str, rows: list[dict], settings: dict) -> str:
    if not any(not r["set_aside"] for r in rows):
        return "every response has all D = 0"
    halves = settings.get("qk_heads") or {}
    if halves and all(h.get("selected") is None for h in halves.values()) and \
            all(name not in r["strategies"] for r in rows):
        return ("no QK heads selected: neither half of the problems has both correct and "
                "incorrect responses to select heads by")
    return "no kept response got a gamma"


def _side(diff: dict | None) -> int | None:
    """+1 / -1 when a Holm-adjusted difference excludes 0 at LEVEL, 0 when not, None when
    not measured."""
    if not diff or diff.get("mean") is None:
        return None
    p = diff.get("p_holm", diff.get("p"))
    if p is None or not math.isfinite(p):
        return None
    return (1 if diff["mean"] > 0 else -1) if p < LEVEL else 0


def _verdict(entry: dict) -> str:
    """Against its own permutation (the primary test), then its position profile."""
    side = _side(entry["S_vs_perm"])
    if side is None:
        return "not measurable"
    text = {1: "beats its permutation", -1: "worse than its permutation",
            0: "no evidence it beats its permutation"}[side]
    position = _side(entry.get("S_vs_position"))
    if side == 1 and position is not None:
        text += {1: " and its position profile", 0: " (not beyond its position profile)",
                 -1: " (worse than its position profile)"}[position]
    return text


def _noise_note(table: dict, names: list[str]) -> str:
    moved = [abs(table[n]["S_half"]["mean"] - table[n]["S"]["mean"]) for n in names
             if table[n].get("measured") and table[n]["S_half"]["mean"] is not None]
    if not moved:
        return "not measured"
    return (f"S with D from half the continuations differs from S by at most "
            f"{max(moved):.3f} (mean over problems); MC noise in |D| pulls S towards 1, and "
            "the intervals over problems include it")


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
              ORACLE: f"{ORACLE} (control: gamma ~ |D|)"}
    rows = []
    for name in names:
        e = table[name]
        control = name in CONTROLS
        rows.append([labels.get(name, name), _ci(e["S"]), _ci(e["rho"]),
                     "-" if control else _ci(e["S_vs_perm"], "+.3f"), _p(e["S_vs_perm"]),
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
    lines.append(f"controls: uniform S = 1 exactly: {c['uniform_S_is_1']}; ceiling above every "
                 f"strategy: {c['ceiling_on_top']}; gamma ~ |D| above every strategy: "
                 f"{c['proportional_above_strategies']}; {c['mc_noise']}")
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
