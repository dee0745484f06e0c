"""The ablation's statistics, over seeds (the seed is the unit): paired t intervals, seeds
needed for a half-width or for power, the area under a held-out curve, steps to a target
reward with censoring, the positive control's power check, per-arm verdicts and the
sequential stopping rule."""

from __future__ import annotations

import itertools
import math

from attnrl.analysis.stats import t975, t_interval
from trainers.ablation.constants import (
    BASELINE,
    CONTROL_DIRECTION,
    SEQUENTIAL_MIN_SEEDS,
    SMOOTH_WINDOW,
)


def mean_or_none(values):
    return sum(values) / len(values) if values else None


def sample_sd(values):
    """Sample standard deviation (ddof 1); 0 for one value, None for none."""
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    mean = mean_or_none(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


Z80 = 0.8416  # the normal 80% quantile: seeds for ~80% power (normal approximation)


def paired_t_interval(diffs: list[float]) -> dict:
    """Mean of paired differences (one per seed: the seed is the unit) with a 95% t
    interval (attnrl.analysis.stats.t_interval): mean, low, high, half_width, sd, n; with
    fewer than 2 differences no interval (low = high = half_width = sd = None)."""
    return t_interval(diffs)


def seeds_needed(sd: float | None, half_width: float | None, power_z: float = 0.0,
                 limit: int = 1000) -> int | None:
    """Smallest number of seeds n >= 2 with (t_{0.975, n-1} + power_z) sd / sqrt(n) <=
    half_width. power_z 0: the expected 95% half-width reaches `half_width`; power_z Z80:
    an effect of size `half_width` excludes 0 in about 80% of ablations. None when sd or
    half_width is unknown or half_width <= 0, or past `limit`."""
    if sd is None or half_width is None or not half_width > 0:
        return None
    for n in range(2, limit + 1):
        if (t975(n - 1) + power_z) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def curve_area(points: list[tuple[int, float]], last_step: int) -> float | None:
    """Area under a held-out learning curve [(step, accuracy)] from step 0 to `last_step`
    by trapezoids, divided by `last_step`: the mean accuracy over training. None unless
    the curve has a step-0 point and a `last_step` point."""
    points = sorted(points)
    if not points or points[0][0] != 0 or points[-1][0] != last_step or last_step <= 0:
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2
               for (s0, a0), (s1, a1) in itertools.pairwise(points))
    return area / last_step


def steps_to_target(steps: list[int], rewards: list[float], target: float,
                    window: int = SMOOTH_WINDOW) -> int | None:
    """First step at which the trailing `window`-step mean training reward is >= target
    (None: never, i.e. censored at the last step)."""
    from trainers.callbacks import smooth

    for step, value in zip(steps, smooth(rewards, window)):
        if value >= target:
            return step
    return None


def censored_steps(values: list[int | None], max_steps: int) -> dict:
    """Steps to target of one strategy's runs, None = never reached by `max_steps`
    (censored: no number is made up for it). runs, reached, censored, `steps` of the runs
    that reached it (sorted), and the median with the censored runs ranked after every
    step: None with median_censored True when the median falls on a censored run."""
    reached = sorted(v for v in values if v is not None)
    n = len(values)
    ordered = reached + [math.inf] * (n - len(reached))
    median = mean_or_none(ordered[(n - 1) // 2:n // 2 + 1]) if n else None
    censored_median = median is not None and math.isinf(median)
    return {"runs": n, "reached": len(reached), "censored": n - len(reached),
            "steps": reached, "median": None if censored_median else median,
            "median_censored": censored_median, "censored_at": max_steps}


def paired_steps(pairs: list[tuple[int | None, int | None]]) -> dict:
    """Paired steps to target, (strategy, uniform) per seed, None = censored.
    `both`: paired_t_interval of strategy minus uniform over the pairs where both runs
    reached the target (its n says how many; a censored run never enters it).
    Sign count over every pair: `earlier` / `later` / `tied` (the strategy reached it
    first / last / at the same step; a run that reached it is earlier than one that did
    not), `neither` (both censored: order unknown)."""
    both = [a - b for a, b in pairs if a is not None and b is not None]
    counts = {"earlier": 0, "later": 0, "tied": 0, "neither": 0}
    for a, b in pairs:
        if a is None and b is None:
            counts["neither"] += 1
        elif b is None or (a is not None and a < b):
            counts["earlier"] += 1
        elif a is None or a > b:
            counts["later"] += 1
        else:
            counts["tied"] += 1
    return {"both": paired_t_interval(both), "both_per_seed": both, "pairs": len(pairs),
            **counts}


def _side(diff: dict) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it holds 0 or is missing."""
    if diff is None or diff["low"] is None:
        return 0
    return 1 if diff["low"] > 0 else -1 if diff["high"] < 0 else 0


def power_check(diff: dict | None, target_half_width: float) -> dict:
    """What the positive control's paired interval against uniform (one metric) says about
    the power of the ablation. status: 'detected' (it excludes 0 in the expected
    direction, CONTROL_DIRECTION), 'not detected' (it holds 0), 'opposite' (it excludes 0
    the other way: the setup is suspect), 'no interval' (< 2 paired seeds), 'absent' (the
    control was not run). Unless detected, from the control's paired sd: `seeds_needed`
    (the expected half-width reaches its observed effect, when that has the expected
    sign), `seeds_needed_80` (about 80% power for that effect) and `seeds_for_target`
    (half-width `target_half_width`)."""
    if diff is None or diff["n"] == 0:
        return {"status": "absent" if diff is None else "no interval", "diff": diff}
    if diff["low"] is None:
        return {"status": "no interval", "diff": diff}
    side = _side(diff)
    status = ("detected" if side == CONTROL_DIRECTION else
              "opposite" if side == -CONTROL_DIRECTION else "not detected")
    out = {"status": status, "diff": diff}
    if status != "detected":
        effect = abs(diff["mean"]) if diff["mean"] * CONTROL_DIRECTION > 0 else None
        out.update(effect=effect, seeds_needed=seeds_needed(diff["sd"], effect),
                   seeds_needed_80=seeds_needed(diff["sd"], effect, Z80),
                   target_half_width=target_half_width,
                   seeds_for_target=seeds_needed(diff["sd"], target_half_width))
    return out


def verdict(diff: dict, what: str, power: dict | None = None) -> str:
    """Verdict of one arm on one metric; 'no difference' is stated as such only when the
    positive control was detected on that metric (`power`, from power_check)."""
    if diff["n"] == 0:
        return "no data"
    if diff["low"] is None:
        return f"{diff['n']} seed: no interval yet"
    side = _side(diff)
    if side:
        return f"{'better' if side > 0 else 'worse'} than uniform ({what})"
    status = "absent" if power is None else power["status"]
    if status == "no interval":
        return f"no difference shown ({what}; power not known yet: the positive control has no interval)"
    if status == "detected":
        return f"no difference ({what}; the positive control was detected at this budget)"
    if status == "absent":
        return f"no difference shown ({what}; power unknown: no positive control run)"
    return f"cannot decide at this budget ({what}: the positive control was not detected)"


def control_verdict(diff: dict, what: str, power: dict) -> str:
    """Verdict of the positive control's own row on one metric."""
    status = power["status"]
    if status in ("no interval", "absent"):
        return "no data" if diff["n"] == 0 else f"{diff['n']} seed: no interval yet"
    if status == "detected":
        return f"detected: below uniform, as expected ({what})"
    if status == "opposite":
        return (f"faster than uniform ({what}): opposite to the expected direction, check "
                "the setup; this budget cannot decide")
    text = f"NOT detected ({what}): this budget cannot decide"
    if power.get("seeds_needed"):
        text += f"; ~{power['seeds_needed']} seeds for a half-width at its effect"
    return text


def stop_rule(summary: dict, half_width: float, max_seeds: int, seeds_spent: int) -> str | None:
    """The sequential option's rule after a round of seeds: 'half-width' when every
    strategy's paired 95% interval against uniform on the area under the held-out curve
    (the primary metric) has a half-width below `half_width` (in points) and at least
    SEQUENTIAL_MIN_SEEDS seeds are spent; else 'max-seeds' when `seeds_spent` >= max_seeds;
    else None (another round). A strategy without an interval (fewer than 2 paired seeds)
    is not narrow."""
    rows = [r for r in summary["table"] if r["strategy"] != BASELINE]
    widths = [r["diff_auc"]["half_width"] for r in rows]
    if seeds_spent >= SEQUENTIAL_MIN_SEEDS and rows and \
            all(w is not None and 100 * w < half_width for w in widths):
        return "half-width"
    if seeds_spent >= max_seeds:
        return "max-seeds"
    return None
