"""Statistics of `attnrl fidelity`: does a strategy put its credit where the outcome is decided?

One response is cut into K chunks (attnrl.fidelity.chunks) with Monte-Carlo step advantages
D_j = V(b_{j+1}) - V(b_j) (attnrl.fidelity.values). A strategy's per-token weights gamma_t
(attnrl.fidelity.weights) give chunk weights w_j = mean of gamma over chunk j, and

    S   = sum_j w_j |D_j| / (mean_j w_j * sum_j |D_j|)    share of credit on decisive chunks
    rho = Spearman rank correlation of w_j with |D_j|     (0 when w or |D| is constant)

S = 1 for uniform credit (any constant gamma), S > 1 when the credit leans on the chunks that
moved the chance of success. A response with all D_j = 0 carries no information and is set
aside (counted).

The null for "attention places the credit": the same gamma values placed at random among the
response's tokens. `permutation_means` gives each response's expected S and rho under that
placement (M permutations); the paired difference S - E_perm[S] is the strategy's gain over
its own permutation. A strategy can beat its permutation by position alone (credit early,
and D large early); `donor_shares` gives the null that keeps the strategy's position
profile: the S of other problems' responses' gamma at the same relative positions.

Inference: the problem is the unit (its responses share the prompt and V(b_0)). Every
per-response number is averaged within its problem; intervals are t intervals over problems
(`cluster_mean`). Against the permutation (and another strategy) the p-value is a sign-flip
randomization of the problems' mean differences (`sign_flip_p`): it uses the spread between
problems, so credit that comes in runs (whose S varies more than its token permutation's)
is not mistaken for credit that follows D. (A test that redraws token placements would be:
on run-structured credit unrelated to D it rejected 21% at 5%; the sign flip 6%.) Against
the position profile, `exchange_test_p` swaps each response's S with one of its donors'
(exact under exchangeability). Holm adjusts over the strategies compared. The
Monte-Carlo noise of D is inside each problem's number, so the interval over problems carries
it; noise in |D| that is independent of w pulls S towards 1 (conservative).
"""

from __future__ import annotations

import math

import numpy as np

from attnrl.analysis.stats import group_codes, t_interval


def chunk_weights(gamma: np.ndarray, bounds) -> np.ndarray:
    """w (..., K): the mean of gamma (..., T) over each chunk [b_j, b_{j+1})."""
    gamma = np.asarray(gamma, dtype=float)
    sums = np.add.reduceat(gamma, np.asarray(bounds[:-1]), axis=-1)
    return sums / np.diff(np.asarray(bounds))


def decisive_share(w: np.ndarray, abs_d: np.ndarray) -> np.ndarray:
    """S (...) of chunk weights w (..., K) against |D| (K,); NaN when sum |D| = 0."""
    w = np.asarray(w, dtype=float)
    abs_d = np.asarray(abs_d, dtype=float)
    total = abs_d.sum()
    if not total > 0:
        return np.full(w.shape[:-1], math.nan)
    return (w * abs_d).sum(-1) / (w.mean(-1) * total)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(x.shape[-1], dtype=float)
                      * np.ones_like(x), axis=-1)
    flat_x, flat_r = x.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):           # ties: few chunks, cheap
        _, inverse, counts = np.unique(flat_x[row], return_inverse=True, return_counts=True)
        if (counts > 1).any():
            sums = np.bincount(inverse, weights=flat_r[row])
            flat_r[row] = (sums / counts)[inverse]
    return flat_r.reshape(x.shape)


def rank_correlation(w: np.ndarray, abs_d: np.ndarray) -> np.ndarray:
    """Spearman rho (...) of w (..., K) with |D| (K,); 0 where either is constant."""
    rw = _ranks(w)
    rd = _ranks(np.asarray(abs_d, dtype=float))
    rw = rw - rw.mean(-1, keepdims=True)
    rd = rd - rd.mean()
    den = np.sqrt((rw ** 2).sum(-1) * (rd ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rw * rd).sum(-1) / den
    return np.where(den > 0, rho, 0.0)


def response_scores(gamma: np.ndarray, bounds, abs_d: np.ndarray) -> tuple[float, float]:
    """(S, rho) of one response: gamma (T,) on its tokens, bounds [0, ..., T], |D| (K,)."""
    w = chunk_weights(gamma, bounds)
    return float(decisive_share(w, abs_d)), float(rank_correlation(w, abs_d))


def permutation_means(gamma: np.ndarray, bounds, abs_d: np.ndarray, draws: int,
                      rng: np.random.Generator) -> tuple[float, float]:
    """(E[S], E[rho]) over `draws` random placements of the same gamma values among the
    response's tokens."""
    gamma = np.asarray(gamma, dtype=float)
    order = np.argsort(rng.random((draws, gamma.size)), axis=1)
    w = chunk_weights(gamma[order], bounds)
    return (float(np.nanmean(decisive_share(w, abs_d))),
            float(rank_correlation(w, abs_d).mean()))


def resample_profile(gamma: np.ndarray, length: int) -> np.ndarray:
    """Another response's gamma (T_o,) on `length` tokens at the same relative positions:
    token t takes gamma[floor((t + 0.5) T_o / length)]."""
    gamma = np.asarray(gamma, dtype=float)
    index = np.floor((np.arange(length) + 0.5) * gamma.size / length).astype(int)
    return gamma[np.minimum(index, gamma.size - 1)]


def problem_means(values, groups) -> np.ndarray:
    """Mean of the finite values (R,) within each problem (groups (R,)); problems without
    one are dropped. Returns (P,)."""
    values, groups = np.asarray(values, dtype=float), np.asarray(groups)
    keep = np.isfinite(values)
    out = [values[keep & (groups == g)].mean() for g in np.unique(groups[keep])]
    return np.asarray(out, dtype=float)


def cluster_mean(values, groups) -> dict:
    """Mean over problems of the per-problem means, with a 95% t interval over problems
    ({'mean', 'low', 'high', 'problems'}; no interval below 2 problems)."""
    per_problem = problem_means(values, groups)
    m = per_problem.size
    if m == 0:
        return {"mean": None, "low": None, "high": None, "problems": 0}
    interval = t_interval(per_problem.tolist())
    return {"mean": interval["mean"], "low": interval["low"], "high": interval["high"],
            "problems": m}


def _problem_average(matrix: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(B,) mean over problems of the per-problem means of `matrix` (R, B) rows."""
    codes = group_codes(groups, matrix.shape[0])
    sums = np.zeros((codes.max() + 1, matrix.shape[1]))
    np.add.at(sums, codes, matrix)
    counts = np.bincount(codes)[:, None]
    return (sums / counts).mean(0)


def exchange_test_p(own, donors, groups, draws: int = 1000,
                    rng: np.random.Generator | None = None) -> float:
    """Two-sided p of 'each response's S is exchangeable with the S its donors' gammas give
    on its cut' (the position-profile null) for T = mean over problems of the per-problem
    mean of own - mean(donors). The null draws, per response, which of the M + 1 values
    plays 'own' (the rest are its donors): exact under exchangeability."""
    rng = rng or np.random.default_rng(0)
    groups = np.asarray(groups)
    own = np.asarray(own, dtype=float)
    donors = np.asarray(donors, dtype=float)                      # (R, M)
    values = np.concatenate([own[:, None], donors], axis=1)       # (R, M + 1)
    m = donors.shape[1]
    totals = values.sum(1, keepdims=True)
    pick = rng.integers(0, m + 1, size=(len(own), draws))
    chosen = np.take_along_axis(values, pick, axis=1)             # (R, B)
    null = chosen - (totals - chosen) / m
    t_obs = _problem_average((own - donors.mean(1))[:, None], groups)[0]
    t_null = _problem_average(null, groups)
    return float((1 + np.sum(np.abs(t_null) >= abs(t_obs) - 1e-12)) / (1 + draws))


def donor_shares(donors: list[np.ndarray], bounds, abs_d: np.ndarray) -> np.ndarray:
    """(M,) S of the response's cut and |D| under each donor's gamma at the same relative
    positions (`resample_profile`)."""
    length = int(bounds[-1])
    w = np.stack([chunk_weights(resample_profile(g, length), bounds) for g in donors])
    return decisive_share(w, abs_d)


def sign_flip_p(values, groups, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p of 'the per-problem means of `values` (paired differences) are centred on
    0': the observed |mean| against `draws` random sign flips of the problem means, (1 + #{as
    large}) / (1 + draws). NaN with no problem."""
    per_problem = problem_means(values, groups)
    if per_problem.size == 0:
        return math.nan
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(draws, per_problem.size))
    null = np.abs(signs @ per_problem) / per_problem.size
    observed = abs(per_problem.mean())
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + draws))


def holm(p_values: dict) -> dict:
    """Holm-adjusted p-values of a family {name: p} (NaN entries stay NaN, not counted)."""
    finite = sorted((p, name) for name, p in p_values.items() if np.isfinite(p))
    out = {name: math.nan for name in p_values}
    running = 0.0
    for i, (p, name) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - i) * p))
        out[name] = running
    return out
