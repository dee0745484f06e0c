"""Statistics of `attnrl analyze`: peak coupling against a permutation null, AUC of head
scores against correctness with a permutation null and a held-out split, bootstrap means.

Pure numpy + torch, no model. Conventions:
- A response is a row of (R, N) arrays; `eligible` marks the positions a peak may occupy.
- Intervals are 95% percentile bootstraps over *groups* (the responses of one problem form
  a group: they share the prompt, so they are not independent); `groups` (R,) int labels,
  None = every row its own group.
- Every random draw comes from `numpy.random.default_rng(seed)`: same seed, same numbers.

Coupling (methods.md 1.4): for target peaks (e.g. FAI top-p%) and source peaks (WAAD or
Delta top-p%), a target peak at s is *coupled* when a source peak u of the same response
lies at or within k tokens before it (s - k <= u <= s). The statistic is the pooled
fraction of coupled target peaks. Null: the target peaks of each response are placed at
uniformly random eligible positions (a permutation of peak positions within the
response), the source peaks stay. With n eligible positions of which C are 'near a source
peak' and m target peaks, the coupled count of one permutation is hypergeometric
(n, C, m): the null is drawn from that distribution directly (exactly the distribution of
a random permutation, without materialising one). Chance = the null's mean; p-value =
(1 + #{null >= observed}) / (1 + permutations) (one-sided: coupling above chance);
ratio = observed / chance with a bootstrap interval over groups (each resample: its
coupled count / its expected count under the null).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnrl.errors import UserError
from attnrl.signals.qk import auc_per_head
from attnrl.signals.types import top_q_mask

LEVEL = 0.95


# ------------------------------------------------------------------------------ helpers

def _groups(groups, n: int) -> np.ndarray:
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise UserError(f"groups must have one label per row ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1]


def bootstrap_rows(groups, n: int, draws: int, rng) -> list[np.ndarray]:
    """`draws` resamples of row indices: whole groups drawn with replacement."""
    codes = _groups(groups, n)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    out = []
    for _ in range(draws):
        chosen = rng.integers(0, len(members), len(members))
        out.append(np.concatenate([members[g] for g in chosen]))
    return out


def interval(samples, level: float = LEVEL) -> list[float]:
    """Percentile interval of finite samples; [nan, nan] if none."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    tail = (1 - level) / 2
    return [float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))]


def p_value_text(p: float, permutations: int) -> str:
    """'p < 0.001' style text; the smallest reachable p is 1 / (permutations + 1)."""
    floor = 1.0 / (permutations + 1)
    if p <= floor:
        return f"p < {max(floor * 1.0001, 0.001):.3g}" if floor < 0.001 else f"p <= {floor:.3g}"
    return f"p = {p:.3g}"


# ------------------------------------------------------------------------------ peaks

def peak_mask(values: torch.Tensor, eligible: torch.Tensor, p: float) -> torch.Tensor:
    """Top p (fraction, e.g. 0.1) of `values` among `eligible` positions of each row
    (ceil(p * n) peaks; ties: earlier position). (R, N) -> (R, N) bool."""
    if not 0.0 < p <= 1.0:
        raise UserError(f"peak fraction must be in (0, 1] (0.1 = top 10%), got {p}")
    return top_q_mask(values, eligible, p)


def near_after(source: torch.Tensor, k: int) -> torch.Tensor:
    """(R, N) bool: position s has a `source` position u with s - k <= u <= s."""
    if k < 0:
        raise UserError(f"coupling window k must be >= 0, got {k}")
    source = source.bool()
    out = source.clone()
    for j in range(1, k + 1):
        if j < source.shape[1]:
            out[:, j:] |= source[:, :-j]
    return out


def coupling(target: torch.Tensor, source: torch.Tensor, eligible: torch.Tensor, k: int = 3,
             permutations: int = 10000, bootstrap: int = 2000, seed: int = 0,
             groups=None) -> dict:
    """How often target peaks sit at or within k tokens after a source peak, against the
    permutation null (module docstring). target, source, eligible: (R, N) bool, target
    within eligible. Returns observed, chance, ratio, their intervals, p, counts."""
    target, source, eligible = target.bool(), source.bool(), eligible.bool()
    if target.shape != source.shape or target.shape != eligible.shape or target.dim() != 2:
        raise UserError("target, source and eligible must be (responses, positions) of one shape")
    if (target & ~eligible).any():
        raise UserError("target peaks must lie on eligible positions")
    near = near_after(source, k) & eligible
    m = target.sum(-1).numpy().astype(np.int64)                        # peaks per response
    hits = (target & near).sum(-1).numpy().astype(np.int64)
    n = eligible.sum(-1).numpy().astype(np.int64)
    c = near.sum(-1).numpy().astype(np.int64)
    rows = m > 0
    total = int(m[rows].sum())
    if total == 0:
        raise UserError("no target peaks: the responses are empty or too short for FAI")
    m, hits, n, c = m[rows], hits[rows], n[rows], c[rows]
    groups_kept = None if groups is None else np.asarray(groups)[rows.astype(bool)]
    rng = np.random.default_rng(seed)
    null_hits = rng.hypergeometric(c, n - c, m, size=(permutations, m.size)).sum(-1)
    null = null_hits / total
    expected = m * c / n                                   # exact mean of each response
    observed = hits.sum() / total
    chance = float(null.mean())
    boots_obs, boots_ratio = [], []
    for idx in bootstrap_rows(groups_kept, m.size, bootstrap, rng):
        boots_obs.append(hits[idx].sum() / m[idx].sum())
        exp = expected[idx].sum()
        boots_ratio.append(hits[idx].sum() / exp if exp > 0 else math.nan)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + permutations)
    return {"observed": float(observed), "observed_ci": interval(boots_obs),
            "chance": chance, "chance_range": interval(null),
            "chance_exact": float(expected.sum() / total),
            "ratio": float(observed / chance) if chance > 0 else math.nan,
            "ratio_ci": interval(boots_ratio), "p_value": p,
            "p_text": p_value_text(p, permutations), "permutations": permutations,
            "target_peaks": total, "coupled_peaks": int(hits.sum()),
            "responses": int(m.size), "k": k}


# ------------------------------------------------------------------------------ AUC

def auc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of each column of scores (n, H) for bool labels (n,), ties 1/2 (float64)."""
    return auc_per_head(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                        torch.as_tensor(np.asarray(labels, dtype=bool))).numpy()


def _check_auc_inputs(scores, labels):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise UserError(f"scores must be (examples, heads) and labels (examples,); got "
                        f"{scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise UserError("scores contain NaN or inf: drop examples without a score")
    if labels.all() or not labels.any():
        raise UserError(f"AUC needs correct and incorrect examples; got {int(labels.sum())} "
                        f"correct of {labels.size}: use more problems or samples")
    return scores, labels


def auc_bootstrap(scores: np.ndarray, labels: np.ndarray, groups=None, draws: int = 1000,
                  rng=None, level: float = LEVEL) -> list[list[float]]:
    """Per column, the bootstrap interval of the AUC (groups resampled; resamples with one
    class only are skipped). Returns (H, 2) as a list."""
    scores, labels = _check_auc_inputs(scores, labels)
    rng = rng if rng is not None else np.random.default_rng(0)
    samples = []
    for idx in bootstrap_rows(groups, labels.size, draws, rng):
        lab = labels[idx]
        if lab.all() or not lab.any():
            continue
        samples.append(auc_columns(scores[idx], lab))
    samples = np.array(samples).reshape(-1, scores.shape[1])
    return [interval(samples[:, h], level) for h in range(scores.shape[1])]


def auc_permutation(scores: np.ndarray, labels: np.ndarray, permutations: int = 1000,
                    rng=None, groups=None) -> dict:
    """Observed AUC per column and its permutation null (labels shuffled): per-column
    two-sided p of |AUC - 1/2|, and the family-wise p (max |AUC - 1/2| over columns in each
    permutation, Westfall-Young single step). Labels are shuffled within nothing: the
    correctness vector is permuted over all examples."""
    scores, labels = _check_auc_inputs(scores, labels)
    rng = rng if rng is not None else np.random.default_rng(0)
    observed = auc_columns(scores, labels)
    dev = np.abs(observed - 0.5)
    exceed = np.zeros_like(dev)
    exceed_max = np.zeros_like(dev)
    null_mean = np.zeros_like(dev)
    for _ in range(permutations):
        null = auc_columns(scores, rng.permutation(labels))
        null_dev = np.abs(null - 0.5)
        exceed += null_dev >= dev - 1e-12
        exceed_max += null_dev.max() >= dev - 1e-12
        null_mean += null
    return {"auc": observed.tolist(), "null_mean": (null_mean / permutations).tolist(),
            "p": ((1 + exceed) / (1 + permutations)).tolist(),
            "p_fwer": ((1 + exceed_max) / (1 + permutations)).tolist(),
            "permutations": permutations}


def split_groups(groups, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two halves of the groups (a seeded shuffle of the groups, cut in two)."""
    codes = _groups(groups, n)
    order = np.random.default_rng(seed).permutation(codes.max() + 1)
    first = set(order[: (len(order) + 1) // 2].tolist())
    mask = np.array([c in first for c in codes])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def held_out_selection(scores: np.ndarray, labels: np.ndarray, top_k: int = 4, groups=None,
                       seed: int = 0, draws: int = 1000, level: float = LEVEL) -> dict:
    """Select the top_k columns by AUC on one half of the groups (high score = correct, the
    rule of the QK credit), report their AUC on the other half with bootstrap intervals
    at level 1 - (1 - level) / top_k (Bonferroni over the reported heads), and the AUC of
    their mean z-scored score (the qk_consistency validity) with a plain interval."""
    scores, labels = _check_auc_inputs(scores, labels)
    if not 1 <= top_k <= scores.shape[1]:
        raise UserError(f"top_k must be in 1..{scores.shape[1]}, got {top_k}")
    select, hold = split_groups(groups, labels.size, seed)
    if labels[select].all() or not labels[select].any() or labels[hold].all() \
            or not labels[hold].any():
        raise UserError("a half of the data has only correct or only incorrect responses: "
                        "use more problems or samples for the held-out split")
    fit_auc = auc_columns(scores[select], labels[select])
    chosen = np.argsort(-fit_auc, kind="stable")[:top_k]
    rng = np.random.default_rng(seed + 1)
    hold_groups = None if groups is None else np.asarray(groups)[hold]
    corrected = 1 - (1 - level) / top_k
    held = auc_columns(scores[hold][:, chosen], labels[hold])
    cis = auc_bootstrap(scores[hold][:, chosen], labels[hold], hold_groups, draws, rng,
                        corrected)
    part = scores[hold][:, chosen]
    z = (part - part.mean(0)) / (part.std(0) + 1e-6)
    combined = z.mean(-1)
    combined_auc = float(auc_columns(combined[:, None], labels[hold])[0])
    combined_ci = auc_bootstrap(combined[:, None], labels[hold], hold_groups, draws, rng,
                                level)[0]
    return {"selected": chosen.tolist(), "select_auc": fit_auc[chosen].tolist(),
            "held_out_auc": held.tolist(), "held_out_ci": cis, "ci_level": corrected,
            "combined_auc": combined_auc, "combined_ci": combined_ci,
            "n_select": int(select.size), "n_held_out": int(hold.size),
            "held_out_correct": int(labels[hold].sum())}


# ------------------------------------------------------------------------------ means

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
