"""AUC of per-response scores (QK heads, baselines) against correctness, within and across
problems, with permutation nulls that keep the problem structure.

Correctness and head scores both cluster by problem (K samples per prompt): a head whose
score is a property of the problem (its length, its numbers) separates easy from hard
problems without knowing whether *this* response is right. Two figures:
- within problems (primary): AUC over the (correct, incorrect) pairs of the same problem
  only, pooled over problems: sum_g U_g / sum_g n+_g n-_g (U_g: Mann-Whitney count of
  problem g, ties 1/2). Problems without both outcomes add no pairs. Null: the labels
  permuted within each problem (the per-problem counts of correct responses stay).
- across problems (second): the plain AUC over all pairs. Null: a block permutation: the
  label vectors of whole problems are moved to random problems of the same size (and
  shuffled within the problem they land in), so the clustering of correctness stays.
  With groups=None every row is its own problem and this is the plain label shuffle
  (the earlier null, valid only for independent responses).
Per head: two-sided p of |AUC - 1/2| (or one-sided, AUC - 1/2, for heads chosen for a high
AUC); family-wise p: max over heads in each permutation (Westfall-Young single step). Both
AUCs are linear in the labels given ranks (within-problem or global average ranks), so a
batch of permutations is one matmul.

Held-out selection (held_out_selection): heads chosen on half of the problems, tested on
the other half by the within-problem permutation null (exact at any size). Its verdict
needs at least MIN_HELD_OUT_PROBLEMS held-out problems with both outcomes; the percentile
bootstrap intervals it also reports are descriptive (simulated on null heads with 5 such
problems, a Bonferroni interval excluded 1/2 in 32-42% of data sets for 5% nominal, and
still in 7-10% at 25-30 problems).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnrl.analysis.stats import (
    LEVEL,
    bootstrap_counts,
    bootstrap_rows,
    group_codes,
    interval,
    intervals,
    split_groups,
)
from attnrl.errors import UserError
from attnrl.signals.qk import auc_per_head

NULLS = ("within", "block")
ALTERNATIVES = ("two-sided", "greater")
# [D] held-out problems with both outcomes below which the held-out test prints "not
# measurable at this size": the smallest size at which a strong head is found in >= 80% of
# data sets. Simulated (tests/attnrl/analysis/test_auc.py, 300 data sets each): a planted
# head of within-problem AUC 0.80 among 40 noise heads, 4 selected, is found (held-out
# family-wise p < 0.01) in 10% at 5 such problems, 40% at 10, 75% at 15, 89% at 20, 95% at
# 25, so below 20 a "no" says little. Null heads at 20: a false verdict in 0.5% of 1,000
# (the test is exact); the earlier bootstrap-interval verdict: 17% at 5, 9% at 10.
MIN_HELD_OUT_PROBLEMS = 20


def auc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC over all pairs of each column of scores (n, H) for bool labels (n,), ties 1/2."""
    return auc_per_head(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                        torch.as_tensor(np.asarray(labels, dtype=bool))).numpy()


def check_auc_inputs(scores, labels):
    """(n, H) float64 scores and (n,) bool labels with both classes, or UserError."""
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


def average_ranks(scores: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
    """1-based average ranks (ties share their mean rank) of each column of scores (n, H),
    over all rows, or within each group of `codes` (n,) ints 0..G-1. Returns (n, H)."""
    x = torch.as_tensor(np.asarray(scores, dtype=np.float64)).T.contiguous()      # (H, n)
    if codes is not None:   # rank within the group: sort by (group, global rank)
        ordinal = torch.as_tensor(2 * average_ranks(scores)).T                    # ints
        x = torch.as_tensor(codes, dtype=torch.float64)[None] * (2 * x.shape[1] + 2) + ordinal
    ordered = torch.sort(x, dim=-1).values
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    upto = torch.searchsorted(ordered, x.contiguous(), right=True)
    ranks = ((below + upto + 1).double() / 2).T.numpy()
    if codes is not None:
        sizes = np.bincount(codes)
        ranks = ranks - (np.cumsum(sizes) - sizes)[codes][:, None]
    return ranks


def pair_counts(labels, codes) -> np.ndarray:
    """(G,) same-problem (correct, incorrect) pairs n+_g n-_g of each problem."""
    labels = np.asarray(labels, dtype=bool)
    return np.bincount(codes, labels) * np.bincount(codes, ~labels)


def within_parts(scores, labels, codes) -> tuple[np.ndarray, np.ndarray]:
    """Per problem g: U_g (G, H) (pairs of g with the correct response scored higher, ties
    1/2) and its pair count D_g = n+_g n-_g (G,). Within AUC = U.sum(0) / D.sum()."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(labels), -1)
    labels = np.asarray(labels, dtype=bool)
    G = int(codes.max()) + 1
    ranks = average_ranks(scores, codes)
    pos = np.bincount(codes, labels, minlength=G)
    neg = np.bincount(codes, ~labels, minlength=G)
    rank_sum = np.zeros((G, scores.shape[1]))
    np.add.at(rank_sum, codes[labels], ranks[labels])
    return rank_sum - (pos * (pos + 1) / 2)[:, None], pos * neg


def within_auc(scores, labels, groups) -> np.ndarray:
    """(H,) AUC over same-problem (correct, incorrect) pairs; NaN without such pairs."""
    labels = np.asarray(labels, dtype=bool)
    U, D = within_parts(scores, labels, group_codes(groups, labels.size))
    return U.sum(0) / D.sum() if D.sum() > 0 else np.full(U.shape[1], math.nan)


def _within_draws(codes, size, rng):
    """(size, n) row indices: a random permutation within every group (rows sorted by
    group, as codes is here)."""
    return np.argsort(codes[None, :] + rng.random((size, codes.size)), axis=1)


def _block_draws(codes, size, rng):
    """(size, n) row indices: whole groups moved to random groups of the same size, rows
    shuffled within (codes sorted)."""
    sizes = np.bincount(codes)
    start = np.cumsum(sizes) - sizes
    dest = np.argsort(sizes, kind="stable")
    src = np.argsort(sizes[None, :] + rng.random((size, sizes.size)), axis=1)
    src_of = np.empty_like(src)
    src_of[:, dest] = src
    shuffled = _within_draws(codes, size, rng)
    offset = np.arange(codes.size) - start[codes]
    rows = start[src_of[:, codes]] + offset[None, :]
    return np.take_along_axis(shuffled, rows, 1)


def auc_permutation(scores, labels, groups=None, permutations: int = 1000, rng=None,
                    null: str = "within", chunk: int = 250,
                    alternative: str = "two-sided") -> dict:
    """Observed AUC per column (within problems for null='within', over all pairs for
    null='block') with its permutation null (module docstring): per-column p and
    family-wise p, two-sided (|AUC - 1/2|) or 'greater' (AUC - 1/2). scores (n, H) or (n,);
    labels (n,) bool; groups (n,) problem labels."""
    if null not in NULLS:
        raise UserError(f"null must be one of {NULLS}, got {null!r}")
    if alternative not in ALTERNATIVES:
        raise UserError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    fold = np.abs if alternative == "two-sided" else (lambda x: x)
    scores, labels = check_auc_inputs(scores, labels)
    rng = rng if rng is not None else np.random.default_rng(0)
    codes = group_codes(groups, labels.size)
    order = np.argsort(codes, kind="stable")
    codes, scores, labels = codes[order], scores[order], labels[order]
    if null == "within":
        pos, pairs = np.bincount(codes, labels), pair_counts(labels, codes)
        if pairs.sum() == 0:
            raise UserError("no problem has both correct and incorrect responses: the "
                            "within-problem AUC needs more samples per problem")
        ranks, offset, scale = average_ranks(scores, codes), -(pos * (pos + 1) / 2).sum(), \
            pairs.sum()
        draw = _within_draws
    else:
        n_pos = labels.sum()
        ranks, offset, scale = average_ranks(scores), -n_pos * (n_pos + 1) / 2, \
            n_pos * (labels.size - n_pos)
        draw = _block_draws
    observed = (labels.astype(np.float64) @ ranks + offset) / scale
    dev = fold(observed - 0.5)
    exceed, exceed_max = np.zeros_like(dev), np.zeros_like(dev)
    for start in range(0, permutations, chunk):
        size = min(chunk, permutations - start)
        null_labels = labels[draw(codes, size, rng)].astype(np.float64)
        null_dev = fold((null_labels @ ranks + offset) / scale - 0.5)         # (size, H)
        exceed += (null_dev >= dev - 1e-12).sum(0)
        exceed_max += (null_dev.max(1)[:, None] >= dev[None, :] - 1e-12).sum(0)
    out = {"auc": observed.tolist(), "p": ((1 + exceed) / (1 + permutations)).tolist(),
           "p_fwer": ((1 + exceed_max) / (1 + permutations)).tolist(),
           "permutations": permutations, "null": null, "alternative": alternative}
    if null == "within":
        out.update(mixed_problems=int((pairs > 0).sum()), pairs=int(pairs.sum()))
    return out


def auc_bootstrap(scores, labels, groups=None, draws: int = 1000, rng=None,
                  level: float = LEVEL) -> list[list[float]]:
    """Per column, the bootstrap interval of the AUC over all pairs (groups resampled;
    resamples with one class only are skipped). Returns (H, 2) as a list."""
    scores, labels = check_auc_inputs(scores, labels)
    rng = rng if rng is not None else np.random.default_rng(0)
    samples = []
    for idx in bootstrap_rows(groups, labels.size, draws, rng):
        lab = labels[idx]
        if lab.all() or not lab.any():
            continue
        samples.append(auc_columns(scores[idx], lab))
    return intervals(np.array(samples).reshape(-1, scores.shape[1]), level)


def within_bootstrap(parts: list[tuple[np.ndarray, np.ndarray]], draws: int, rng):
    """Paired bootstrap over the problems with pairs: the same resamples of problems for
    every (U (G, H_i), D (G,)) in `parts` (one set of problems, so D is shared).
    Returns one (draws, H_i) array of within-problem AUCs per part."""
    D = parts[0][1]
    mixed = np.flatnonzero(D > 0)
    counts = bootstrap_counts(mixed.size, draws, rng).astype(np.float64)
    return [(counts @ U[mixed]) / (counts @ D[mixed])[:, None] for U, _ in parts]


def _z_mean(part: np.ndarray) -> np.ndarray:
    return ((part - part.mean(0)) / (part.std(0) + 1e-6)).mean(-1)


def held_out_selection(scores, labels, top_k: int = 4, groups=None, seed: int = 0,
                       draws: int = 1000, level: float = LEVEL, baselines=None,
                       permutations: int = 1000,
                       min_problems: int = MIN_HELD_OUT_PROBLEMS) -> dict:
    """Select the top_k columns by within-problem AUC on one half of the problems (high
    score = correct, the rule of the QK credit) and test them on the other half.

    The halves split the problems with both outcomes evenly (split_groups strata). Held
    out ('test'): one-sided within-problem permutation p of each selected head, family-wise
    over the selected heads, and of the validity score (mean z-scored score of the heads,
    the qk_consistency rule); 'measurable' = at least `min_problems` held-out problems with
    both outcomes (a verdict needs it). Descriptive: each head's within-problem AUC with a
    bootstrap interval over the held-out problems at level 1 - (1 - level) / top_k
    (Bonferroni), the validity's at `level`, the across-problem AUC of both.

    `baselines` {name: (n,) values}: each oriented on the selection half (higher = correct
    when its within AUC there is >= 1/2, else negated, as the heads are chosen there), with
    its held-out within AUC in that orientation ('flipped' when below 1/2: the direction
    did not hold) and the paired bootstrap interval (same problem resamples) of head AUC -
    reference, reference = the baseline read in its better direction on the held-out half
    (max(AUC, 1 - AUC) in every resample): a gain must beat the baseline however it is
    oriented."""
    scores, labels = check_auc_inputs(scores, labels)
    if not 1 <= top_k <= scores.shape[1]:
        raise UserError(f"top_k must be in 1..{scores.shape[1]}, got {top_k}")
    codes = group_codes(groups, labels.size)
    D_all = pair_counts(labels, codes)
    select, hold = split_groups(codes, labels.size, seed, strata=D_all[codes] > 0)
    if (D_all[np.unique(codes[select])] == 0).all() or (D_all[np.unique(codes[hold])] == 0).all():
        raise UserError("the held-out split needs problems with both correct and incorrect "
                        f"responses in each half; found {int((D_all > 0).sum())}: use more "
                        "problems or samples")
    fit = within_auc(scores[select], labels[select], codes[select])
    chosen = np.argsort(-fit, kind="stable")[:top_k]
    lab, hold_codes = labels[hold], group_codes(codes[hold], hold.size)
    part = scores[hold][:, chosen]
    combined = _z_mean(part)
    columns = {"heads": part, "combined": combined[:, None]}
    oriented = {}
    for name, values in (baselines or {}).items():
        values = np.asarray(values, dtype=np.float64)
        select_auc = float(within_auc(values[select], labels[select], codes[select])[0])
        sign = 1.0 if select_auc >= 0.5 else -1.0
        oriented[name] = (sign, max(select_auc, 1 - select_auc))
        columns[name] = sign * values[hold][:, None]
    parts = {key: within_parts(value, lab, hold_codes) for key, value in columns.items()}
    auc = {key: U.sum(0) / D.sum() for key, (U, D) in parts.items()}
    boots = dict(zip(parts, within_bootstrap(list(parts.values()), draws,
                                             np.random.default_rng(seed + 1))))
    corrected = 1 - (1 - level) / top_k
    mixed = int((parts["heads"][1] > 0).sum())
    out = {"selected": chosen.tolist(), "select_auc": fit[chosen].tolist(),
           "held_out_auc": auc["heads"].tolist(),
           "held_out_ci": intervals(boots["heads"], corrected), "ci_level": corrected,
           "combined_auc": float(auc["combined"][0]),
           "combined_ci": interval(boots["combined"][:, 0], level),
           "held_out_auc_across": auc_columns(part, lab).tolist(),
           "combined_auc_across": float(auc_columns(combined[:, None], lab)[0]),
           "n_select": int(select.size), "n_held_out": int(hold.size),
           "held_out_correct": int(lab.sum()), "held_out_mixed_problems": mixed,
           "held_out_pairs": int(parts["heads"][1].sum()),
           "min_mixed_problems": min_problems, "measurable": mixed >= min_problems,
           "test": held_out_test(part, combined, lab, hold_codes, permutations, seed + 2),
           "baselines": {}}
    for name, (sign, select_auc) in oriented.items():
        base, base_draws = float(auc[name][0]), boots[name][:, 0]
        reference = max(base, 1 - base)
        reference_draws = np.maximum(base_draws, 1 - base_draws)
        out["baselines"][name] = {
            "direction": "higher = correct" if sign > 0 else "lower = correct",
            "select_auc": select_auc, "held_out_auc": base,
            "held_out_ci": interval(base_draws, level), "flipped": base < 0.5,
            "reference_auc": reference,
            "heads_minus_reference": (auc["heads"] - reference).tolist(),
            "heads_minus_reference_ci": intervals(boots["heads"] - reference_draws[:, None],
                                                  corrected),
            "combined_minus_reference": float(auc["combined"][0] - reference),
            "combined_minus_reference_ci": interval(boots["combined"][:, 0] - reference_draws,
                                                    level)}
    return out


def held_out_test(part, combined, labels, codes, permutations: int, seed: int) -> dict:
    """One-sided within-problem permutation test on the held-out half: per selected head
    (part (n, k)), p family-wise over the k heads; the validity score (combined (n,)) alone."""
    rng = np.random.default_rng(seed)
    heads = auc_permutation(part, labels, codes, permutations, rng, "within",
                            alternative="greater")
    valid = auc_permutation(combined, labels, codes, permutations, rng, "within",
                            alternative="greater")
    return {"null": "labels permuted within held-out problems", "alternative": "greater",
            "permutations": permutations, "p_fwer": heads["p_fwer"],
            "combined_p": valid["p"][0]}
