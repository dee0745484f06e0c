"""The ablation's registered tests: one primary test, Holm-corrected secondary tests, and a
positive control whose effect is predicted before it is observed.

Plan (fixed before the runs; `attnrl ablate` states it in its table):
    primary     PRIMARY_ARM - uniform on the area under the held-out learning curve (AUC),
                paired t over seeds (the seed is the unit), two-sided, alpha ALPHA
    secondary   every other (arm, metric) pair against uniform on final accuracy and AUC,
                p-values Holm-corrected as one family at ALPHA
    control     uniform at half the learning rate (`uniform_half_lr`), judged on AUC. Its
                predicted effect, per seed, from uniform's own curve: half the learning rate
                moves the weights in t steps about as far as the full rate in t / 2 (first
                order in the step size, for SGD and for Adam, whose step is proportional to
                the rate), so its curve is uniform's at half the step count and its AUC over
                [0, T] is uniform's AUC over [0, T / 2]:
                    predicted diff = AUC_uniform[0, T/2] - AUC_uniform[0, T]
                "Detected" when its paired interval on AUC lies below 0.
    power       of the primary test at a PRIMARY_EFFECT difference with the observed paired
                sd over the planned seeds (normal approximation, as the plan's seed count);
                an sd above PRIMARY_SD_LIMIT is stated as underpowered for that effect

    t_two_sided_p(2.7764, 4)        # 0.05 (t_{0.975, 4})
    holm({"a": 0.01, "b": 0.04})    # {"a": 0.02, "b": 0.04}
"""

from __future__ import annotations

import itertools
import math

ALPHA = 0.05
PRIMARY_ARM = "coupled"      # [D] the library's recommended attention strategy
PRIMARY_METRIC = "auc"       # [D] learning speed, measured over the whole curve
PRIMARY_EFFECT = 0.03       # [D] the AUC difference the plan is powered for (3 points)
PRIMARY_SD_LIMIT = 0.032     # [D] the plan's sd above which 10 seeds are underpowered for it
CONTROL = "uniform_half_lr"
CONTROL_METRIC = "auc"
# recipe variants that are arms but not credit strategies: credit and learning-rate scale
VARIANTS = {CONTROL: {"credit": "uniform", "learning_rate_scale": 0.5}}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, fpmin = 1e-15, 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > fpmin else fpmin)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > fpmin else fpmin)
            c = 1.0 + num / c
            c = c if abs(c) > fpmin else fpmin
            h *= d * c
        if abs(d * c - 1.0) < tiny:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if not math.isfinite(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def power_at(effect: float, sd: float, n: int) -> float | None:
    """Power of the two-sided paired t test at alpha 0.05 for a true mean difference
    `effect` with paired sd `sd` over n seeds, normal approximation:
    Phi(d - t) + Phi(-d - t), d = effect sqrt(n) / sd, t = t_{0.975, n-1}. None for n < 2."""
    from attnrl.analysis.stats import t975

    if n < 2 or sd is None:
        return None
    if sd <= 0:
        return 1.0
    d, t = effect * math.sqrt(n) / sd, t975(n - 1)
    return normal_cdf(d - t) + normal_cdf(-d - t)


def paired_test(diff: dict) -> dict:
    """t statistic and two-sided p of a paired_t_interval result (needs n >= 2, sd > 0)."""
    if diff.get("low") is None or diff["n"] < 2:
        return {"t": None, "df": None, "p": None}
    if not diff["sd"]:
        return {"t": math.inf if diff["mean"] else 0.0, "df": diff["n"] - 1,
                "p": 0.0 if diff["mean"] else 1.0}
    t = diff["mean"] / (diff["sd"] / math.sqrt(diff["n"]))
    return {"t": t, "df": diff["n"] - 1, "p": t_two_sided_p(t, diff["n"] - 1)}


def holm(pvalues: dict) -> dict:
    """Holm step-down adjusted p-values of one family {name: p}; None values are left out."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    m, running, out = len(items), 0.0, {}
    for i, (p, name) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = running
    return out


def curve_area_between(points, start: int, stop: int) -> float | None:
    """Mean of a piecewise-linear curve [(step, value)] over [start, stop]; None unless
    points exist at both ends."""
    inside = sorted(p for p in points if start <= p[0] <= stop)
    if not inside or inside[0][0] != start or inside[-1][0] != stop or stop <= start:
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in itertools.pairwise(inside))
    return area / (stop - start)


def predicted_control_diff(points, last_step: int) -> float | None:
    """The half-learning-rate control's predicted AUC difference for one seed, from
    uniform's full curve (step 0 ... last_step): AUC[0, T/2] - AUC[0, T]. None when the curve
    has no point at T / 2."""
    if last_step % 2:
        return None
    half, full = (curve_area_between(points, 0, last_step // 2),
                  curve_area_between(points, 0, last_step))
    return None if half is None or full is None else half - full


def registered(rows: dict, predicted: list[float], planned_seeds: int,
               primary_arm: str = PRIMARY_ARM) -> dict:
    """The plan's outcome from the summary's table rows {strategy: row} (each with
    diff_final / diff_auc from paired_t_interval) and the control's per-seed predicted
    differences. Before `planned_seeds` paired seeds the outcome is marked interim: the
    plan's verdict is the one at its fixed seed count."""
    primary = None
    if primary_arm in rows:
        diff = rows[primary_arm][f"diff_{PRIMARY_METRIC}"]
        primary = {"arm": primary_arm, "metric": PRIMARY_METRIC, "diff": diff,
                   **paired_test(diff)}
        primary["significant"] = primary["p"] is not None and primary["p"] < ALPHA
        sd = diff.get("sd")
        primary["power"] = None if sd is None else {
            "effect": PRIMARY_EFFECT, "sd": sd, "seeds": planned_seeds,
            "power": power_at(PRIMARY_EFFECT, sd, planned_seeds),
            "underpowered": sd > PRIMARY_SD_LIMIT, "sd_limit": PRIMARY_SD_LIMIT}
    family = {}
    for name, row in rows.items():
        if name in ("uniform", CONTROL):
            continue
        for metric in ("final", "auc"):
            if (name, metric) != (primary_arm, PRIMARY_METRIC):
                family[f"{name}:{metric}"] = paired_test(row[f"diff_{metric}"])["p"]
    adjusted = holm(family)
    secondary = [{"test": key, "p": family[key], "p_holm": adjusted.get(key),
                  "significant": adjusted.get(key) is not None and adjusted[key] < ALPHA}
                 for key in family]
    control = None
    if CONTROL in rows:
        diff = rows[CONTROL][f"diff_{CONTROL_METRIC}"]
        mean_pred = sum(predicted) / len(predicted) if predicted else None
        control = {"arm": CONTROL, "metric": CONTROL_METRIC, "diff": diff,
                   "predicted_per_seed": predicted, "predicted": mean_pred,
                   "detected": diff.get("high") is not None and diff["high"] < 0}
    arms = [row[f"diff_{PRIMARY_METRIC}"]["n"] for name, row in rows.items()
            if name != "uniform"]
    done = primary["diff"]["n"] if primary else min(arms, default=planned_seeds)
    return {"alpha": ALPHA, "planned_seeds": planned_seeds, "done_seeds": done,
            "interim": done < planned_seeds,
            "primary": primary, "secondary": secondary, "control": control}


def _points(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _interval(d: dict) -> str:
    return f"{_points(d['mean'])} [{_points(d.get('low'))}, {_points(d.get('high'))}] points"


def registered_lines(result: dict) -> list[str]:
    """The table's statement of the registered tests, in plan order."""
    lines = []
    primary, control = result["primary"], result["control"]
    if result.get("interim"):
        lines.append(f"# INTERIM: {result['done_seeds']} of {result['planned_seeds']} "
                     "planned seeds; the registered verdict is the one at the planned count "
                     "(progress only)")
    if control is not None:
        d = control["diff"]
        state = ("no interval yet" if d.get("low") is None else
                 "so far (judged at the planned seeds)" if result.get("interim") else
                 "DETECTED" if control["detected"] else "not detected")
        lines.append(f"# control {control['arm']} (uniform at half the learning rate) on AUC: "
                     f"{_interval(d)}, predicted {_points(control['predicted'])} from "
                     f"uniform's own curves: {state}")
    if result.get("interim"):  # the plan tests at its seed count: progress only before it
        n = result["planned_seeds"]
        if primary is not None and primary["diff"].get("low") is not None:
            d = primary["diff"]
            lines.append(f"# PRIMARY ({primary['arm']} - uniform, AUC, paired t): so far "
                         f"{_interval(d)} over {d['n']} seeds; tested at {n} seeds, not before")
        power = primary.get("power") if primary is not None else None
        if power is not None:
            lines.append(f"# power so far: about {100 * power['power']:.0f}% at a "
                         f"{100 * power['effect']:.1f}-point AUC difference with {n} seeds at "
                         f"the paired sd observed so far ({100 * power['sd']:.2f} points; the "
                         f"plan's power statement is made at {n} seeds)")
        return lines
    if primary is not None:
        d = primary["diff"]
        if primary["p"] is None:
            lines.append(f"# PRIMARY ({primary['arm']} - uniform, AUC, paired t over seeds): "
                         f"{d['n']} paired seeds, no test yet")
        else:
            if primary["significant"]:
                what = "better" if d["mean"] > 0 else "worse"
                verdict = f"{primary['arm']} learns {what} than uniform"
            elif control is not None and control["detected"]:
                verdict = ("no difference shown, at a budget that detected the control's "
                           f"{_points(control['diff']['mean'])}-point effect")
            else:
                verdict = "no difference shown; the control was not detected: cannot decide"
            lines.append(f"# PRIMARY ({primary['arm']} - uniform, AUC, paired t over "
                         f"{d['n']} seeds): {_interval(d)}, t = {primary['t']:.2f}, "
                         f"p = {primary['p']:.3f}: {verdict}")
    power = primary.get("power") if primary is not None else None
    if power is not None:
        lines.append(f"# power of the primary test at a {100 * power['effect']:.1f}-point AUC "
                     f"difference: about {100 * power['power']:.0f}% with {power['seeds']} "
                     f"seeds at the observed paired sd {100 * power['sd']:.2f} points"
                     + (f"; UNDERPOWERED for it (the plan assumed sd <= "
                        f"{100 * power['sd_limit']:.1f})" if power["underpowered"] else ""))
    tested = [s for s in result["secondary"] if s["p"] is not None]
    if tested:
        lines.append("# secondary (Holm over " + str(len(tested)) + " tests, alpha "
                     f"{result['alpha']:g}): " + "; ".join(
                         f"{s['test']} p = {s['p']:.3f}, Holm {s['p_holm']:.3f}"
                         f"{' (significant)' if s['significant'] else ''}" for s in tested))
    return lines
