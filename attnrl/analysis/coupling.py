"""Peak coupling of `attnrl analyze` (methods.md 1.4) against a cross-response null (the
verdict) and two secondary nulls.

For target peaks (e.g. FAI top p) and source peaks (WAAD or Delta top p), a target peak at
s is *coupled* when a source peak u of the same response lies at or within k tokens before
it (s - k <= u <= s). The statistic is the pooled fraction of coupled target peaks.

Nulls (positions are response positions, 0 = first response token):
- cross (the verdict): the target peaks of each response paired with the source peaks of
  another response of similar length. Responses are sorted by their number of eligible
  positions and cut into pools of about PAIR_POOL; a draw permutes the sources uniformly
  within every pool. Both signals keep everything about themselves (runs of peaks, their
  position trend at any resolution, the eligibility pattern); only the pairing of one
  response's source with the same response's target is broken. Under "no coupling" the
  responses of a pool are exchangeable, so the test is exact: a draw may pair a response
  with itself (chance 1 / pool size), which keeps the draws a permutation group.
- uniform (secondary): the m target peaks of a response at uniformly random positions of
  its eligible set E (|E| = n; C = eligible positions near a source peak): hypergeometric
  (n, |C|, m). It ignores runs and shared position trends.
- structured (secondary): E, in order, cut into `bins` runs of equal relative length;
  within each the target pattern is rotated by a uniform random offset (one per response,
  bin and draw). Keeps runs and the position trend to bin resolution only: with trends
  finer than a bin it is anti-conservative (simulated without coupling, 4 bins, density
  falling to exp(-3) / exp(-6) / exp(-10) over the response: 14-16% / 46% / 99% rejections
  at 5%, the cross null 4-5%; tests/attnrl/analysis/test_coupling.py), so no verdict.

Per null: chance = its mean fraction (cross: the mean coupled count of each response's
targets paired with the *other* responses of its pool; uniform: m |C| / n; structured:
m_b |C_b| / n_b per bin); chance_range = 95% of its draws; p = (1 + #{null >= observed}) /
(1 + draws) (one-sided: coupling above chance); ratio = observed / chance; excess =
(observed - chance) / (1 - chance): 0 at chance, 1 when every target peak is coupled (unlike
the ratio, at most 1 / chance, it can reach 1 when chance is high). Intervals: bootstrap
over groups, each resample against its own expected count. The top-level verdict fields
(chance, ratio, excess, p and intervals) are the cross null's.

Several statistics at once (e.g. one per layer): `max_over_family` turns the draws of the
same cross pairings (pass `partners`) into family-wise p-values of the maximum
standardized coupling (single-step max-T).
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

POSITION_BINS = 4    # [D] structured (secondary) null: bins of relative position
PAIR_POOL = 8        # [D] cross null: responses per pool of similar length (in the 512
#                      committed GSM8K responses a pool spans 3 tokens of length at the
#                      median, 8 at most; a response draws itself 1 time in 8)
NULLS = ("cross", "uniform", "structured")
VERDICT_NULL = "cross"


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


def length_pools(lengths, pool: int = PAIR_POOL) -> np.ndarray:
    """(R,) pool id of each response for the cross null: responses sorted by `lengths` (R,)
    (ties: row order) and cut into max(1, R // pool) runs of equal size (pool to
    2 * pool - 1 responses each)."""
    if pool < 2:
        raise UserError(f"the cross-response pool must hold >= 2 responses, got {pool}")
    lengths = np.asarray(lengths)
    count = max(1, lengths.size // pool)
    ids = np.empty(lengths.size, dtype=np.int64)
    ids[np.argsort(lengths, kind="stable")] = np.arange(lengths.size) * count // lengths.size
    return ids


def cross_partners(pools: np.ndarray, draws: int, rng) -> np.ndarray:
    """(draws, R) int: partner[d, r] = the response whose source peaks are paired with the
    target peaks of r in draw d; a uniform random permutation within each pool of `pools`
    (R,) per draw (a response may draw itself)."""
    pools = np.asarray(pools)
    order = np.argsort(pools, kind="stable")
    within = np.argsort(pools[order][None, :] + rng.random((draws, pools.size)), axis=1)
    partners = np.empty((draws, pools.size), dtype=np.int64)
    partners[:, order] = order[within]
    return partners


def pool_slots(pools: np.ndarray) -> np.ndarray:
    """(R,) rank of each response within its pool (row order)."""
    pools = np.asarray(pools)
    order = np.argsort(pools, kind="stable")
    sizes = np.bincount(pools)
    slots = np.empty(pools.size, dtype=np.int64)
    slots[order] = np.arange(pools.size) - (np.cumsum(sizes) - sizes)[pools[order]]
    return slots


def cross_counts(target: np.ndarray, near: np.ndarray, pools: np.ndarray) -> dict:
    """Coupled counts of every within-pool pairing. target (R, N) bool, near (R, N) bool
    (near a source peak, not masked by eligibility), pools (R,). Returns 'pair' (R, S):
    pair[r, pool_slots[j]] = coupled count of r's targets with j's sources (j in r's pool;
    S = largest pool), 'observed' (R,) (j = r) and 'chance' (R,): the mean over the other
    responses of its pool (its own count when alone)."""
    t, c = target.astype(np.float64), near.astype(np.float64)
    slots = pool_slots(pools)
    pair = np.zeros((t.shape[0], int(np.bincount(pools).max())))
    for p in np.unique(pools):
        members = np.flatnonzero(pools == p)
        pair[np.ix_(members, slots[members])] = t[members] @ c[members].T
    rows = np.arange(t.shape[0])
    own = pair[rows, slots]
    size = np.bincount(pools)[pools]
    chance = np.where(size > 1, (pair.sum(1) - own) / np.maximum(size - 1, 1), own)
    return {"pair": pair, "observed": own, "chance": chance, "slots": slots}


def cross_null(pair: np.ndarray, slots: np.ndarray, partners: np.ndarray,
               chunk: int = 512) -> np.ndarray:
    """(draws,) total coupled count of each draw: sum_r pair[r, slots[partners[d, r]]]."""
    rows = np.arange(pair.shape[0])
    out = np.empty(partners.shape[0])
    for start in range(0, partners.shape[0], chunk):
        out[start:start + chunk] = pair[rows, slots[partners[start:start + chunk]]].sum(1)
    return out


def max_over_family(observed, null) -> np.ndarray:
    """Family-wise one-sided p of each of F statistics: observed (F,) against null
    (F, draws) drawn jointly (the same permutations for every member). Each statistic is
    standardized by its own null mean and standard deviation; p_f = (1 + #{draws whose
    largest standardized null >= z_f}) / (1 + draws) (single-step max-T). Members with a
    constant null get p = 1 and stay out of the maximum."""
    observed, null = np.asarray(observed, dtype=float), np.asarray(null, dtype=float)
    mean, sd = null.mean(1), null.std(1)
    live = sd > 0
    if not live.any():
        return np.ones(observed.size)
    z = (observed[live] - mean[live]) / sd[live]
    top = ((null[live] - mean[live, None]) / sd[live, None]).max(0)          # (draws,)
    p = np.ones(observed.size)
    p[live] = (1 + (top[None, :] >= z[:, None] - 1e-12).sum(1)) / (1 + null.shape[1])
    return p


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
             groups=None, bins: int = POSITION_BINS, pool: int = PAIR_POOL,
             partners: np.ndarray | None = None, keep_null: bool = False) -> dict:
    """How often target peaks sit at or within k tokens after a source peak, against the
    cross null (verdict) and the uniform and structured nulls (module docstring). target,
    source, eligible: (R, N) bool, target within eligible. `partners` (permutations, R'):
    cross pairings to reuse (R' = responses with target peaks; default: drawn from the
    seed); `keep_null`: also return them ('_partners') and the cross draws as fractions
    ('_null'), for `max_over_family`. Returns observed, every null and the verdict."""
    target, source, eligible = target.bool(), source.bool(), eligible.bool()
    if target.shape != source.shape or target.shape != eligible.shape or target.dim() != 2:
        raise UserError("target, source and eligible must be (responses, positions) of one shape")
    if (target & ~eligible).any():
        raise UserError("target peaks must lie on eligible positions")
    if bins < 1:
        raise UserError(f"position bins must be >= 1, got {bins}")
    raw_near = near_after(source, k).numpy()
    t, e = target.numpy(), eligible.numpy()
    m = t.sum(-1)
    rows = m > 0
    total = int(m.sum())
    if total == 0:
        raise UserError("no target peaks: the responses are empty or too short for FAI")
    if rows.sum() < 2:
        raise UserError("the cross-response null needs >= 2 responses with target peaks; "
                        "give more responses")
    t, e, m, raw_near = t[rows], e[rows], m[rows], raw_near[rows]
    near = raw_near & e
    hits = (t & near).sum(-1)
    n, c = e.sum(-1), near.sum(-1)
    observed = hits.sum() / total
    rng = np.random.default_rng(seed)
    pools = length_pools(n, pool)
    if partners is None:
        partners = cross_partners(pools, permutations, rng)
    elif partners.shape != (permutations, m.size) or (pools[partners] != pools).any():
        raise UserError(f"partners must be (permutations, responses with peaks) = "
                        f"{(permutations, m.size)} pairings within these length pools, got "
                        f"{partners.shape} from other responses")
    cross = cross_counts(t, raw_near, pools)
    null = {"cross": cross_null(cross["pair"], cross["slots"], partners),
            "uniform": rng.hypergeometric(c, n - c, m, size=(permutations, m.size)).sum(-1)}
    counts, length, unit_row, unit_mean = shift_counts(t, near, e, bins)
    null["structured"] = _shift_null(counts, length, permutations, rng)
    expected = {"cross": cross["chance"], "uniform": m * c / n,
                "structured": np.bincount(unit_row, unit_mean, minlength=m.size)}
    codes = group_codes(None if groups is None else np.asarray(groups)[rows], m.size)

    def per_group(values):
        return np.bincount(codes, values, minlength=codes.max() + 1)

    boot = bootstrap_counts(codes.max() + 1, bootstrap, rng)
    hits_g, m_g = per_group(hits), per_group(m)
    sizes = np.bincount(pools)
    descriptions = {
        "cross": f"targets paired with the sources of other responses of similar length "
                 f"(pools of {sizes.min()}-{sizes.max()} responses)",
        "uniform": "target peaks at uniformly random eligible positions",
        "structured": f"target pattern rotated within {bins} position bins"}
    nulls = {name: _summary(descriptions[name], null[name], per_group(expected[name]), boot,
                            hits_g, m_g, float(observed), total, permutations)
             for name in NULLS}
    out = {"observed": float(observed),
           "observed_ci": interval((boot @ hits_g) / (boot @ m_g)),
           "target_peaks": total, "coupled_peaks": int(hits.sum()), "responses": int(m.size),
           "k": k, "bins": bins, "pool": pool, "permutations": permutations, **nulls,
           "verdict_null": VERDICT_NULL}
    for key in ("chance", "chance_range", "ratio", "ratio_ci", "excess", "excess_ci",
                "p_value", "p_text"):
        out[key] = nulls[VERDICT_NULL][key]
    if keep_null:
        out["_partners"], out["_null"] = partners, null["cross"] / total
    return out
