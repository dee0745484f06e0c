"""Per-response records, the tests against both nulls and the summary of `attnrl fidelity`
(the table and the picture: attnrl.fidelity.render).

Statistics: attnrl.fidelity.stats. Three rows are controls, not strategies. Two are built
from the very D they are scored against (in-sample):
- `mc_proportional`: gamma = 1 + (gamma_amp - 1) |D_j| / max_j |D_j| on chunk j's tokens,
  credit proportional to the Monte-Carlo step advantage, in the strategies' [1, gamma_amp];
- `mc_ceiling`: the largest S any gamma in [1, gamma_amp] reaches on the response: gamma_amp
  on the m chunks of largest |D_j| (the best m), 1 elsewhere. No strategy can beat it.
The third is the positive control with a predictable effect on the run's own data:
- `mc_split`: the `mc_proportional` gamma from the first k // 2 continuations, scored on D
  from the other k - k // 2 (independent draws): informative credit by construction, so it
  must beat its permutation; if it does not, the run is too small to find anything.
`uniform` must give S = 1 exactly.
"""

from __future__ import annotations

import math

import numpy as np

from attnrl.fidelity import stats
from attnrl.fidelity.values import binomial_se, step_advantages, values_of

ORACLE = "mc_proportional"
CEILING = "mc_ceiling"
SPLIT = "mc_split"
CONTROLS = (CEILING, ORACLE, SPLIT)
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
TEST_DRAWS = 1000      # redraws of the randomization tests [D]
GAMMA_DECIMALS = 6     # gamma as recorded (and as scored: the tests redraw recorded values)


def response_records(cuts, gammas: dict, gamma_amp: float, permutations: int, seed: int,
                     records=None) -> list[dict]:
    """One dict per response: its cut, values, D and every strategy's gamma, w, S, rho, the
    permutation means and S with D from half the continuations. (The position-profile null
    and the p-values are computed from these records by `summarize`.)"""
    rows = []
    for r, cut in enumerate(cuts):
        d = step_advantages(cut)
        abs_d, abs_half = np.abs(d), np.abs(step_advantages(cut, "first"))
        abs_second = np.abs(step_advantages(cut, "second"))
        row = {"problem": cut.problem, "response": cut.text, "correct": cut.correct,
               "tokens": len(cut.response_ids), "bounds": cut.bounds, "chunking": cut.chunking,
               "values": [round(float(v), 4) for v in values_of(cut)],
               "successes": cut.successes, "trials": cut.trials,
               "half_successes": cut.half_successes,
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
            gamma = np.round(np.asarray(gamma, dtype=float), GAMMA_DECIMALS)
            entry = {"gamma": gamma.tolist(),
                     "w": [round(float(x), 4) for x in stats.chunk_weights(gamma, cut.bounds)]}
            if not row["set_aside"]:
                entry["S"], entry["rho"] = stats.response_scores(gamma, cut.bounds, abs_d)
                entry["S_perm"], entry["rho_perm"] = stats.permutation_means(
                    gamma, cut.bounds, abs_d, permutations, rng)
                entry["S_half"] = float(stats.decisive_share(
                    stats.chunk_weights(gamma, cut.bounds), abs_half))
            row["strategies"][name] = entry
        split = np.round(oracle_gamma(cut.bounds, abs_half, gamma_amp), GAMMA_DECIMALS)
        entry = {"gamma": split.tolist(),
                 "w": [round(float(x), 4) for x in stats.chunk_weights(split, cut.bounds)]}
        if not row["set_aside"] and abs_second.sum() > 0:
            entry["S"], entry["rho"] = stats.response_scores(split, cut.bounds, abs_second)
            entry["S_perm"], entry["rho_perm"] = stats.permutation_means(
                split, cut.bounds, abs_second, permutations, rng)
        row["strategies"][SPLIT] = entry
        rows.append(row)
    return rows


def abs_steps(row: dict, part: str = "all") -> np.ndarray:
    """|D| (K,) of a record, from all its continuations or one half ('second': the split
    control is scored on it)."""
    from attnrl.fidelity.values import CutResponse

    cut = CutResponse(row["problem"], [], [], bool(row["correct"]), row["bounds"],
                      successes=row["successes"], trials=row["trials"],
                      half_successes=row.get("half_successes", []))
    return np.abs(step_advantages(cut, part))


def strategy_tests(rows: list[dict], name: str, rng: np.random.Generator,
                   draws: int = TEST_DRAWS, position: bool = True) -> dict:
    """From the records of the kept responses the strategy weighted: the paired differences
    S - E_perm[S] and S - E_position[S] with their intervals over problems and their
    randomization p-values (attnrl.fidelity.stats.sign_flip_p, exchange_test_p).
    Position donors: up to POSITION_DONORS responses of other problems, same strategy."""
    part = "second" if name == SPLIT else "all"
    items = [r for r in rows if not r["set_aside"] and "S" in r["strategies"].get(name, {})]
    if not items:
        return {}
    groups = np.array([r["problem"] for r in items])
    entries = [r["strategies"][name] for r in items]
    gammas = [np.asarray(e["gamma"], dtype=float) for e in entries]
    bounds = [r["bounds"] for r in items]
    abs_d = [abs_steps(r, part) for r in items]
    own = np.array([e["S"] for e in entries])
    perm = np.array([e["S_perm"] for e in entries])
    out = {"S_vs_perm": stats.cluster_mean(own - perm, groups)}
    out["S_vs_perm"]["p"] = stats.sign_flip_p(own - perm, groups, draws=20 * draws,
                                              seed=int(rng.integers(1 << 30)))
    if not position:
        return out
    donors = []
    for i, row in enumerate(items):
        others = np.flatnonzero(groups != row["problem"])
        if others.size == 0:
            return out
        chosen = rng.choice(others, size=min(POSITION_DONORS, others.size), replace=False)
        donors.append(stats.donor_shares([gammas[k] for k in chosen], bounds[i], abs_d[i]))
    width = min(len(d) for d in donors)
    donors = np.stack([d[:width] for d in donors])
    out["S_vs_position"] = stats.cluster_mean(own - donors.mean(1), groups)
    out["S_vs_position"]["p"] = stats.exchange_test_p(own, donors, groups, draws, rng)
    return out


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


CALIBRATION_REDRAWS = 100   # random-credit redraws in the null calibration [D]


def _random_credit(n: int, q: float, gamma_amp: float, rng: np.random.Generator,
                   runs: bool = False) -> np.ndarray:
    """(n,) gamma_amp on ceil(q n) tokens unrelated to anything: single tokens drawn without
    replacement, or runs of 1-5 consecutive tokens (circular: every position equally likely)
    until ceil(q n) are marked."""
    count = math.ceil(q * n - 1e-9)
    g = np.ones(n)
    if not runs:
        g[rng.choice(n, size=count, replace=False)] = gamma_amp
        return g
    marked = np.zeros(n, dtype=bool)
    while marked.sum() < count:
        start, length = int(rng.integers(n)), int(rng.integers(1, 6))
        for k in range(length):
            if marked.sum() >= count:
                break
            marked[(start + k) % n] = True
    g[marked] = gamma_amp
    return g


def null_calibration(rows: list[dict], q: float, gamma_amp: float, redraws: int,
                     seed: int = 0, permutations: int = 50, draws: int = 200) -> dict:
    """How often the two tests reject at LEVEL on this run's own D when the credit has no link
    to D: `redraws` times, every kept response gets ceil(q n) tokens at gamma_amp, drawn as
    single tokens (the `random` strategy) or, in every other redraw, as runs of 1-5
    consecutive tokens at uniform circular offsets (the run structure of attention credit,
    every position equally likely), and S is compared with its permutation and its position
    profile over problems as in `summarize`. Returns the rejection rates (nominal LEVEL) with
    their binomial standard errors."""
    kept = [r for r in rows if not r["set_aside"]]
    if not kept or redraws < 1:
        return {"redraws": 0}
    rng = np.random.default_rng([int(seed), 99])
    abs_d = [abs_steps(r) for r in kept]
    rejected = {"permutation": 0, "position": 0}
    for redraw in range(redraws):
        gammas = []
        for r in kept:
            n = int(r["tokens"])
            gammas.append(_random_credit(n, q, gamma_amp, rng, runs=redraw % 2 == 1))
        synthetic = []
        for r, g, d in zip(kept, gammas, abs_d):
            s_own, _ = stats.response_scores(g, r["bounds"], d)
            s_perm, _ = stats.permutation_means(g, r["bounds"], d, permutations, rng)
            synthetic.append({**r, "strategies": {"random": {
                "gamma": g.tolist(), "S": s_own, "S_perm": s_perm}}})
        tests = strategy_tests(synthetic, "random", rng, draws)
        for key, test in (("permutation", "S_vs_perm"), ("position", "S_vs_position")):
            rejected[key] += bool(tests.get(test, {}).get("p", 1.0) < LEVEL)
    out = {"redraws": redraws, "level": LEVEL}
    for key, count in rejected.items():
        rate = count / redraws
        out[key] = {"rejection_rate": rate, "se": math.sqrt(max(rate * (1 - rate), 1e-12)
                                                             / redraws)}
    return out


def summarize(rows: list[dict], names: list[str], settings: dict,
              calibration_redraws: int = CALIBRATION_REDRAWS,
              test_draws: int = TEST_DRAWS) -> dict:
    """The summary dict: counts, per-strategy statistics with intervals over problems,
    paired differences against the permutation, the position profile and `random`
    (Holm-adjusted over the strategies compared), the controls (the null calibration on
    this run's D included) and the recommendation."""
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
                 "rho_vs_perm": stats.cluster_mean(*_column(rows, name, "rho", "rho_perm"))}
        if name not in (CEILING, ORACLE):       # in-sample controls: S is their only number
            entry.update(strategy_tests(rows, name, np.random.default_rng([seed, 7]),
                                        test_draws, position=name in names))
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
    split = table[SPLIT].get("S_vs_perm") or {}
    controls = {
        "split_control_detected": bool(split.get("mean") is not None and split["mean"] > 0
                                       and split.get("p", 1.0) < LEVEL),
        "uniform_S_is_1": bool(uniform) and all(abs(v - 1.0) < 1e-9 for v in uniform),
        "ceiling_on_top": above_best(CEILING), "proportional_above_strategies":
        above_best(ORACLE), "best_strategy": best, "mc_noise": _noise_note(table, names),
        "null_calibration": null_calibration(
            rows, float(settings.get("q", 0.4)), float(settings.get("gamma_amp", 1.5)),
            calibration_redraws, seed)}
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
                       "means; p: sign flips of the problems' paired differences (permutation, "
                       "random), the exchange of each response's S with its donors' (position "
                       "profile); Holm over the strategies compared (uniform and the MC "
                       "controls excluded)")}


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
    side = _side(entry.get("S_vs_perm"))
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
