"""Shared statistics of `attnrl analyze`: problem groups, bootstraps over problems,
intervals, permutation p-values, the problem split and bootstrap means.

The statistics themselves live in attnrl.analysis.coupling (peak coupling, two nulls) and
attnrl.analysis.auc (head scores vs correctness, within and across problems).

Pure numpy + torch, no model. Conventions:
- A response is a row; `groups` (R,) labels its problem (the responses of one problem share
  the prompt, so they are not independent); None = every row its own group.
- Intervals are 95% percentile bootstraps over groups (whole problems resampled).
- Every random draw comes from `numpy.random.default_rng(seed)`: same seed, same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from attnrl.errors import UserError

LEVEL = 0.95


def group_codes(groups, n: int) -> np.ndarray:
    """(n,) int codes 0..G-1 of the group labels (None: every row its own group)."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise UserError(f"groups must have one label per row ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(n)


def bootstrap_rows(groups, n: int, draws: int, rng) -> list[np.ndarray]:
    """`draws` resamples of row indices: whole groups drawn with replacement."""
    codes = group_codes(groups, n)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    out = []
    for _ in range(draws):
        chosen = rng.integers(0, len(members), len(members))
        out.append(np.concatenate([members[g] for g in chosen]))
    return out


def bootstrap_counts(n_groups: int, draws: int, rng) -> np.ndarray:
    """(draws, n_groups) int: how often each group is drawn in each resample (n_groups
    draws with replacement). A statistic that is a ratio of per-group sums is then
    (counts @ numerator) / (counts @ denominator)."""
    picks = rng.integers(0, n_groups, (draws, n_groups)) + n_groups * np.arange(draws)[:, None]
    return np.bincount(picks.ravel(), minlength=draws * n_groups).reshape(draws, n_groups)


def interval(samples, level: float = LEVEL) -> list[float]:
    """Percentile interval of finite samples; [nan, nan] if none."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    tail = (1 - level) / 2
    return [float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))]


def intervals(samples, level: float = LEVEL) -> list[list[float]]:
    """`interval` of each column of samples (draws, H)."""
    samples = np.asarray(samples, dtype=float)
    return [interval(samples[:, h], level) for h in range(samples.shape[1])]


def permutation_p(null, observed, permutations: int):
    """One-sided permutation p: (1 + #{null >= observed}) / (1 + permutations); null
    (permutations, ...) against observed (...)."""
    exceed = (np.asarray(null) >= np.asarray(observed) - 1e-12).sum(0)
    return (1 + exceed) / (1 + permutations)


def p_value_text(p: float, permutations: int) -> str:
    """'p < 0.001' style text; the smallest reachable p is 1 / (permutations + 1)."""
    floor = 1.0 / (permutations + 1)
    if p <= floor:
        return f"p < {max(floor * 1.0001, 0.001):.3g}" if floor < 0.001 else f"p <= {floor:.3g}"
    return f"p = {p:.3g}"


def split_groups(groups, n: int, seed: int = 0, strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two halves of the groups (a seeded shuffle of the groups, cut in two).
    `strata` (n,) labels constant within a group (e.g. 'problem has both outcomes'): each
    stratum is shuffled and cut in two on its own, so both halves get their share."""
    codes = group_codes(groups, n)
    rng = np.random.default_rng(seed)
    if strata is None:
        order = rng.permutation(codes.max() + 1)
        first = set(order[: (len(order) + 1) // 2].tolist())
    else:
        per_group = np.zeros(codes.max() + 1, dtype=np.asarray(strata).dtype)
        per_group[codes] = strata
        if (per_group[codes] != np.asarray(strata)).any():
            raise UserError("strata must be constant within each group")
        first = set()
        for i, value in enumerate(np.unique(per_group)):   # odd sizes: extra one alternates
            members = rng.permutation(np.flatnonzero(per_group == value))
            first |= set(members[: (len(members) + 1 - i % 2) // 2].tolist())
    mask = np.array([c in first for c in codes])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def mean_ci(values, groups=None, draws: int = 2000, seed: int = 0) -> dict:
    """Mean of values (n,) with a bootstrap interval over groups."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"mean": math.nan, "ci": [math.nan, math.nan], "n": 0}
    rng = np.random.default_rng(seed)
    boots = [values[idx].mean() for idx in bootstrap_rows(groups, values.size, draws, rng)]
    return {"mean": float(values.mean()), "ci": interval(boots), "n": int(values.size)}


def compare_means(values, labels, groups=None, draws: int = 2000, seed: int = 0) -> dict:
    """Mean (and interval) of `values` for correct and incorrect rows, and their difference
    (correct - incorrect) with a bootstrap interval over groups."""
    values, labels = np.asarray(values, dtype=float), np.asarray(labels, dtype=bool)
    g = None if groups is None else np.asarray(groups)
    out = {"correct": mean_ci(values[labels], None if g is None else g[labels], draws, seed),
           "incorrect": mean_ci(values[~labels], None if g is None else g[~labels], draws,
                                seed)}
    rng = np.random.default_rng(seed + 7)
    diffs = []
    for idx in bootstrap_rows(g, values.size, draws, rng):
        lab = labels[idx]
        if lab.all() or not lab.any():
            continue
        diffs.append(values[idx][lab].mean() - values[idx][~lab].mean())
    both = labels.any() and (~labels).any()
    out["difference"] = float(values[labels].mean() - values[~labels].mean()) if both \
        else math.nan
    out["difference_ci"] = interval(diffs)
    return out


# two-sided 95% quantiles of Student's t, df = 1..30 (t_{0.975, df})
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """t_{0.975, df}: T975 up to 30 degrees of freedom, past it the normal quantile with
    the first three terms of the Cornish-Fisher expansion in 1/df (error < 1e-5)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_interval(values) -> dict:
    """Mean of independent values (one per unit: a seed, a problem) with a 95% Student t
    interval, mean +- t_{0.975, m-1} sd / sqrt(m), sd with ddof 1. Returns {'mean', 'low',
    'high', 'half_width', 'sd', 'n'}; below 2 values no interval (None) and, for none, no
    mean. The one t interval of the library: the ablation over seeds, fidelity over
    problems, the main job over seeds."""
    values = [float(v) for v in values]
    m = len(values)
    mean = sum(values) / m if m else None
    if m < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "sd": None,
                "n": m}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
    half = t975(m - 1) * sd / math.sqrt(m)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half,
            "sd": sd, "n": m}
