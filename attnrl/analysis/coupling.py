"""Peak coupling of `attnrl analyze` (methods.md 1.4) against two nulls.

For target peaks (e.g. FAI top p) and source peaks (WAAD or Delta top p), a target peak at
s is *coupled* when a source peak u of the same response lies at or within k tokens before
it (s - k <= u <= s). The statistic is the pooled fraction of coupled target peaks.

Both nulls keep the source peaks and move the target peaks of each response within its
eligible positions E (|E| = n; C = the eligible positions near a source peak; m target
peaks):
- uniform: the m target peaks at uniformly random positions of E. The coupled count is
  hypergeometric (n, |C|, m) and drawn from that distribution directly. It ignores that
  peaks come in runs and that source and target may share a trend over the position.
- structured (circular shift within position bins): E, in order, is cut into `bins` runs
  of equal relative length (quarters by default); within each bin the target pattern is
  rotated by a uniform random offset (one per response, bin and draw). This keeps the
  number of target peaks in every bin (the position trend, to bin resolution) and the runs
  of adjacent peaks (cut only where a run wraps round its bin's end). One rotation of the
  whole response (bins = 1) keeps the runs but has exactly the uniform null's mean, so it
  cannot correct a trend shared by source and target; the bins do.

Per null: chance = its exact mean fraction (expected coupled count / target peaks; per bin
m_b |C_b| / n_b for the shifts); chance_range = 95% of its draws; p = (1 + #{null >=
observed}) / (1 + draws) (one-sided: coupling above chance); ratio = observed / chance;
excess = (observed - chance) / (1 - chance): 0 at chance, 1 when every target peak is
coupled, negative below chance. Unlike the ratio (at most 1 / chance, e.g. 1.26 at chance
0.79) the excess can reach 1 when chance is high. Intervals: bootstrap over groups, each
resample against its own expected count.

Verdict fields (top level) come from the stricter null: p_value = the larger p; chance =
the larger chance, with ratio, excess and their intervals against it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnrl.analysis.stats import (
    bootstrap_counts,
    group_codes,
    interval,
    p_value_text,
    permutation_p,
)
from attnrl.errors import UserError
from attnrl.signals.types import top_q_mask

POSITION_BINS = 4        # structured null: bins of relative position within a response
NULLS = ("uniform", "structured")


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


def shift_counts(target: np.ndarray, near: np.ndarray, eligible: np.ndarray, bins: int):
    """Coupled count of every rotation of the target pattern within each position bin.

    target, near, eligible: (R, N) bool (target, near within eligible). Bin b of a response
    with n eligible positions holds its eligible positions of rank i with
    floor(i * bins / n) = b. Returns counts (U, W) (unit u = one bin with target peaks;
    column s = coupled count with the targets rotated by s; valid for s < length[u]),
    length (U,), row (U,) (the response of each unit) and mean (U,) (the exact mean count
    over the length[u] rotations: m_b |C_b| / n_b)."""
    R = eligible.shape[0]
    n = eligible.sum(1)
    rows, cols = np.nonzero(eligible)
    rank = (np.cumsum(eligible, 1) - 1)[rows, cols]
    b = rank * bins // n[rows]
    unit = rows * bins + b
    offset = rank - (b * n[rows] + bins - 1) // bins             # rank - first rank in bin
    edges = (np.arange(bins + 1)[None, :] * n[:, None] + bins - 1) // bins
    length = np.diff(edges, axis=1).ravel()
    width = max(1, int(length.max(initial=0)))
    t = np.zeros((R * bins, width))
    c = np.zeros((R * bins, width))
    t[unit, offset] = target[rows, cols]
    c[unit, offset] = near[rows, cols]
    keep = t.sum(1) > 0
    t, c, length = t[keep], c[keep], length[keep]
    positions = np.arange(width)[None, :]
    counts = np.zeros_like(t)
    for s in range(width):
        rotated = (positions + s) % np.maximum(length, 1)[:, None]
        counts[:, s] = (t * np.take_along_axis(c, rotated, 1)).sum(1)
    mean = t.sum(1) * c.sum(1) / length                   # exact mean over the rotations
    return counts, length, np.flatnonzero(keep) // bins, mean


def _shift_null(counts, length, draws: int, rng, chunk: int = 512) -> np.ndarray:
    """(draws,) coupled counts with one random rotation per unit per draw."""
    out = np.empty(draws)
    units = np.arange(length.size)
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        shift = (rng.random((size, length.size)) * length).astype(np.int64)
        out[start:start + size] = counts[units, shift].sum(1)
    return out


def _summary(description, null_hits, expected, boot, hits_g, m_g, observed, total,
             permutations) -> dict:
    """One null's chance, range, ratio, excess (with bootstrap intervals) and p."""
    chance = float(expected.sum() / total)
    peaks_b = boot @ m_g
    hits_b, expected_b = boot @ hits_g, boot @ expected
    chance_b = expected_b / peaks_b
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_b = np.where(expected_b > 0, hits_b / expected_b, math.nan)
        excess_b = np.where(chance_b < 1, (hits_b / peaks_b - chance_b) / (1 - chance_b),
                            math.nan)
    p = float(permutation_p(null_hits / total, observed, permutations))
    return {"null": description, "chance": chance, "chance_range": interval(null_hits / total),
            "ratio": observed / chance if chance > 0 else math.nan, "ratio_ci": interval(ratio_b),
            "excess": (observed - chance) / (1 - chance) if chance < 1 else math.nan,
            "excess_ci": interval(excess_b), "p_value": p,
            "p_text": p_value_text(p, permutations)}


def coupling(target: torch.Tensor, source: torch.Tensor, eligible: torch.Tensor, k: int = 3,
             permutations: int = 10000, bootstrap: int = 2000, seed: int = 0,
             groups=None, bins: int = POSITION_BINS) -> dict:
    """How often target peaks sit at or within k tokens after a source peak, against the
    uniform and the structured null (module docstring). target, source, eligible: (R, N)
    bool, target within eligible. Returns observed, both nulls, and the verdict fields."""
    target, source, eligible = target.bool(), source.bool(), eligible.bool()
    if target.shape != source.shape or target.shape != eligible.shape or target.dim() != 2:
        raise UserError("target, source and eligible must be (responses, positions) of one shape")
    if (target & ~eligible).any():
        raise UserError("target peaks must lie on eligible positions")
    if bins < 1:
        raise UserError(f"position bins must be >= 1, got {bins}")
    near = (near_after(source, k) & eligible).numpy()
    t, e = target.numpy(), eligible.numpy()
    m = t.sum(-1)
    rows = m > 0
    total = int(m.sum())
    if total == 0:
        raise UserError("no target peaks: the responses are empty or too short for FAI")
    t, near, e, m = t[rows], near[rows], e[rows], m[rows]
    hits = (t & near).sum(-1)
    n, c = e.sum(-1), near.sum(-1)
    observed = hits.sum() / total
    rng = np.random.default_rng(seed)
    null = {"uniform": rng.hypergeometric(c, n - c, m, size=(permutations, m.size)).sum(-1)}
    counts, length, unit_row, unit_mean = shift_counts(t, near, e, bins)
    null["structured"] = _shift_null(counts, length, permutations, rng)
    expected = {"uniform": m * c / n,
                "structured": np.bincount(unit_row, unit_mean, minlength=m.size)}
    codes = group_codes(None if groups is None else np.asarray(groups)[rows], m.size)

    def per_group(values):
        return np.bincount(codes, values, minlength=codes.max() + 1)

    boot = bootstrap_counts(codes.max() + 1, bootstrap, rng)
    hits_g, m_g = per_group(hits), per_group(m)
    descriptions = {"uniform": "target peaks at uniformly random eligible positions",
                    "structured": f"target pattern rotated within {bins} position bins"}
    nulls = {name: _summary(descriptions[name], null[name], per_group(expected[name]), boot,
                            hits_g, m_g, float(observed), total, permutations)
             for name in NULLS}
    by_chance = max(NULLS[::-1], key=lambda name: nulls[name]["chance"])
    by_p = max(NULLS[::-1], key=lambda name: nulls[name]["p_value"])
    out = {"observed": float(observed),
           "observed_ci": interval((boot @ hits_g) / (boot @ m_g)),
           "target_peaks": total, "coupled_peaks": int(hits.sum()), "responses": int(m.size),
           "k": k, "bins": bins, "permutations": permutations, **nulls,
           "chance_from": by_chance, "p_from": by_p}
    for key in ("chance", "chance_range", "ratio", "ratio_ci", "excess", "excess_ci"):
        out[key] = nulls[by_chance][key]
    out["chance_exact"] = out["chance"]
    out["p_value"], out["p_text"] = nulls[by_p]["p_value"], nulls[by_p]["p_text"]
    return out
