"""AUC of head scores vs correctness (attnrl.analysis.auc) against brute force: pair
enumeration (all pairs, same-problem pairs), exact enumeration of the within-problem and
block permutation nulls on small inputs, resampled data sets for the paired bootstrap.
Planted structure: labels clustered by problem with head scores that are a property of the
problem (no within-problem information) are not significant within problems, while the
earlier all-responses shuffle calls them significant; a planted within-problem effect is
found. Tolerances: exact quantities to 1e-12, Monte Carlo p-values to 0.015-0.02."""

import itertools
import math

import numpy as np
import pytest

from attnrl.analysis.auc import (
    _block_draws,
    auc_columns,
    auc_permutation,
    average_ranks,
    held_out_selection,
    within_auc,
    within_bootstrap,
    within_parts,
)
from attnrl.analysis.stats import bootstrap_counts, group_codes
from attnrl.errors import UserError


def ref_auc(pos, neg):
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def ref_within(scores, labels, groups):
    """Same-problem pairs only, enumerated; NaN without pairs."""
    num = den = 0.0
    for g in np.unique(groups):
        rows = groups == g
        for a in scores[rows & labels]:
            for b in scores[rows & ~labels]:
                num += (a > b) + 0.5 * (a == b)
                den += 1
    return num / den if den else math.nan


def small_case(seed, sizes=(3, 2, 4, 3, 1, 5), heads=3):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    labels = rng.random(groups.size) < 0.5
    scores = rng.integers(0, 4, size=(groups.size, heads)).astype(float)   # ties on purpose
    return scores, labels, groups


def test_auc_over_all_pairs_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(30, 4)).astype(float)
    labels = rng.random(30) < 0.4
    ref = [ref_auc(scores[labels, h], scores[~labels, h]) for h in range(4)]
    assert np.allclose(auc_columns(scores, labels), ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_within_auc_and_ranks_match_enumeration(seed):
    scores, labels, groups = small_case(seed)
    groups = np.random.default_rng(seed).permutation(groups)          # rows in any order
    got = within_auc(scores, labels, groups)
    for h in range(scores.shape[1]):
        ref = ref_within(scores[:, h], labels, groups)
        assert (math.isnan(ref) and math.isnan(got[h])) or abs(got[h] - ref) < 1e-12
    codes = group_codes(groups, groups.size)
    ranks = average_ranks(scores, codes)
    for i in range(groups.size):
        same = scores[codes == codes[i]]
        ref = (same < scores[i]).sum(0) + ((same == scores[i]).sum(0) + 1) / 2
        assert np.allclose(ranks[i], ref, atol=1e-12)


def exact_p(scores, labels, groups, assignments, stat):
    """Per-head and family-wise two-sided p over an enumerated, equally likely null."""
    dev = np.abs(stat(scores, labels, groups) - 0.5)
    null = np.array([np.abs(stat(scores, lab, groups) - 0.5) for lab in assignments])
    return ((null >= dev - 1e-12).mean(0), (null.max(1)[:, None] >= dev - 1e-12).mean(0))


def within_assignments(labels, groups):
    """Every within-problem relabelling (each distinct permutation of a problem's labels,
    with multiplicity, so all are equally likely)."""
    per_group = [list(itertools.permutations(labels[groups == g])) for g in np.unique(groups)]
    for combo in itertools.product(*per_group):
        out = labels.copy()
        for g, values in zip(np.unique(groups), combo):
            out[groups == g] = values
        yield out


def test_within_null_matches_exact_enumeration():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(4), 3)
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1], dtype=bool)
    scores = rng.normal(size=(12, 3)) + labels[:, None] * np.array([1.5, 0.0, 0.5])
    p_ref, fwer_ref = exact_p(scores, labels, groups, list(within_assignments(labels, groups)),
                              within_auc)
    got = auc_permutation(scores, labels, groups, 20000, np.random.default_rng(2), "within")
    assert np.allclose(got["auc"], within_auc(scores, labels, groups), atol=1e-12)
    assert np.abs(np.array(got["p"]) - p_ref).max() < 0.015
    assert np.abs(np.array(got["p_fwer"]) - fwer_ref).max() < 0.015
    assert got["mixed_problems"] == 4 and got["pairs"] == 8


def block_assignments(labels, groups):
    """Every block relabelling: problems' label vectors moved among problems of the same
    size (all maps), each shuffled within (all orders)."""
    ids = np.unique(groups)
    sizes = {g: int((groups == g).sum()) for g in ids}
    strata = [[g for g in ids if sizes[g] == s] for s in sorted(set(sizes.values()))]
    maps = [list(itertools.permutations(stratum)) for stratum in strata]
    for chosen in itertools.product(*maps):
        source = {d: s for stratum, perm in zip(strata, chosen) for d, s in zip(stratum, perm)}
        orders = [list(itertools.permutations(labels[groups == source[g]])) for g in ids]
        for combo in itertools.product(*orders):
            out = labels.copy()
            for g, values in zip(ids, combo):
                out[groups == g] = values
            yield out


def test_block_null_matches_exact_enumeration_and_keeps_clusters():
    rng = np.random.default_rng(3)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4])
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    scores = rng.normal(size=(12, 2)) + labels[:, None] * np.array([1.0, 0.0])
    p_ref, fwer_ref = exact_p(scores, labels, groups, list(block_assignments(labels, groups)),
                              lambda s, lab, g: auc_columns(s, lab))
    got = auc_permutation(scores, labels, groups, 20000, np.random.default_rng(4), "block")
    assert np.abs(np.array(got["p"]) - p_ref).max() < 0.02
    assert np.abs(np.array(got["p_fwer"]) - fwer_ref).max() < 0.02
    # each draw moves whole problems among problems of the same size
    draws = _block_draws(groups, 200, np.random.default_rng(5))
    for rows in draws:
        for g in range(5):
            source = set(groups[rows[groups == g]].tolist())
            assert len(source) == 1 and (groups == source.pop()).sum() == (groups == g).sum()


def clustered(seed, n_problems=30, samples=8, heads=60, problem_heads=10, within=None):
    """Correctness clustered by problem (a problem difficulty drives it) and head scores
    that are a problem-level property plus tiny noise: heads 0..problem_heads-1 follow the
    difficulty (they know which problems are easy, not which response is right), the rest
    are unrelated problem properties. `within`: (head, effect) adds a within-problem
    effect: the correct responses of a problem score higher."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_problems), samples)
    difficulty = rng.normal(size=n_problems)
    labels = rng.random(groups.size) < 1 / (1 + np.exp(-4 * difficulty[groups]))
    level = rng.normal(size=(n_problems, heads))
    level[:, :problem_heads] += 1.5 * difficulty[:, None]
    scores = level[groups] + 0.1 * rng.normal(size=(groups.size, heads))
    if within is not None:
        head, effect = within
        scores[:, head] += effect * labels
    return scores, labels, groups


def old_null_fwer(scores, labels, permutations, seed):
    """The earlier null, written out: correctness shuffled over all responses."""
    rng = np.random.default_rng(seed)
    dev = np.abs(auc_columns(scores, labels) - 0.5)
    exceed = np.zeros_like(dev)
    for _ in range(permutations):
        exceed += np.abs(auc_columns(scores, rng.permutation(labels)) - 0.5).max() >= dev - 1e-12
    return (1 + exceed) / (1 + permutations)


def test_problem_level_scores_are_not_significant_within_problems():
    for seed in range(2):
        scores, labels, groups = clustered(seed)
        within = auc_permutation(scores, labels, groups, 500, np.random.default_rng(seed))
        assert within["mixed_problems"] >= 5
        assert min(within["p_fwer"]) > 0.05, min(within["p_fwer"])
        # the earlier null (all responses shuffled) calls problem-level heads significant,
        # including some unrelated to correctness ...
        old = old_null_fwer(scores, labels, 300, seed)
        assert (old[:10] < 0.01).sum() >= 5 and (old[10:] < 0.05).sum() >= 3
        iid = auc_permutation(scores, labels, None, 300, np.random.default_rng(seed), "block")
        assert np.abs(np.array(iid["p_fwer"]) - old).max() < 0.05   # groups=None: that null
        # ... the block null keeps the heads that follow the difficulty, drops the others
        block = auc_permutation(scores, labels, groups, 300, np.random.default_rng(seed),
                                "block")
        assert min(block["p_fwer"][10:]) > 0.05


def test_planted_within_problem_effect_is_detected():
    scores, labels, groups = clustered(5, within=(33, 0.6))
    result = auc_permutation(scores, labels, groups, 500, np.random.default_rng(0))
    assert int(np.argmax(np.abs(np.array(result["auc"]) - 0.5))) == 33
    assert result["p_fwer"][33] < 0.01 and result["auc"][33] > 0.8


def planted_heads(seed, n_problems=80, samples=4, heads=40, planted=7, effect=1.0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_problems), samples)
    labels = rng.random(groups.size) < 0.35
    scores = rng.normal(size=(groups.size, heads)) * rng.uniform(0.5, 3, heads) \
        + rng.normal(size=heads) * 4
    if planted is not None:
        scores[:, planted] += effect * labels * scores[:, planted].std()
    return scores, labels, groups


def test_planted_qk_head_is_found_and_held_out_auc_exceeds_half():
    scores, labels, groups = planted_heads(0)
    held = held_out_selection(scores, labels, top_k=4, groups=groups, draws=400)
    assert held["selected"][0] == 7
    assert held["held_out_auc"][0] > 0.6 and held["held_out_ci"][0][0] > 0.5
    perm = auc_permutation(scores, labels, groups, 300, np.random.default_rng(1))
    assert perm["p_fwer"][7] < 0.01


def test_pure_noise_heads_have_no_held_out_interval_excluding_half():
    for seed in range(3):
        scores, labels, groups = planted_heads(seed + 20, planted=None)
        held = held_out_selection(scores, labels, top_k=4, groups=groups, seed=seed, draws=400)
        for lo, hi in held["held_out_ci"]:
            assert lo <= 0.5 <= hi, (seed, held["held_out_auc"], held["held_out_ci"])
        perm = auc_permutation(scores, labels, groups, 200, np.random.default_rng(seed))
        assert min(perm["p_fwer"]) > 0.01


def test_within_bootstrap_equals_resampled_data_sets():
    """Each resample equals the within AUC of the data set built from the drawn problems
    (a problem drawn twice counted twice), for both parts with the same draws."""
    scores, labels, groups = small_case(7, sizes=(3, 4, 2, 3, 5, 2), heads=2)
    codes = group_codes(groups, groups.size)
    parts = [within_parts(scores, labels, codes), within_parts(-scores[:, :1], labels, codes)]
    a, b = within_bootstrap(parts, 20, np.random.default_rng(9))
    mixed = np.flatnonzero(parts[0][1] > 0)
    counts = bootstrap_counts(mixed.size, 20, np.random.default_rng(9))
    for d in range(20):
        rows, new_groups = [], []
        for slot, g in enumerate(np.repeat(mixed, counts[d])):
            members = np.flatnonzero(codes == g)
            rows += members.tolist()
            new_groups += [slot] * members.size
        rows, new_groups = np.array(rows), np.array(new_groups)
        for h in range(2):
            assert abs(a[d, h] - ref_within(scores[rows, h], labels[rows], new_groups)) < 1e-12
        assert abs(b[d, 0] - ref_within(-scores[rows, 0], labels[rows], new_groups)) < 1e-12


def test_held_out_baselines_and_paired_differences():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(60), 4)
    labels = rng.random(240) < 0.5
    length = 40 + 20 * (~labels) + rng.integers(0, 5, 240)      # correct answers are shorter
    head = rng.normal(size=240) + 1.0 * labels                 # a planted head, selected
    scores = np.stack([rng.normal(size=240), head, rng.normal(size=240)], 1)
    held = held_out_selection(scores, labels, top_k=1, groups=groups, draws=300,
                              baselines={"length": length, "same": head})
    base = held["baselines"]
    assert held["selected"] == [1] and held["held_out_ci"][0][0] > 0.5
    assert base["length"]["direction"] == "lower = correct"
    assert base["length"]["held_out_auc"] == 1.0
    assert base["length"]["combined_minus_baseline_ci"][1] < 0      # the head loses to length
    assert base["length"]["heads_minus_baseline_ci"][0][1] < 0
    # a baseline equal to the selected head: every paired difference is exactly 0
    assert base["same"]["direction"] == "higher = correct"
    assert base["same"]["heads_minus_baseline_ci"][0] == [0.0, 0.0]
    # against loops: held-out within AUC of the oriented baseline
    _, hold = _halves(labels, groups)
    ref = ref_within(-length[hold].astype(float), labels[hold], groups[hold])
    assert abs(base["length"]["held_out_auc"] - ref) < 1e-12


def _halves(labels, groups):
    from attnrl.analysis.auc import pair_counts
    from attnrl.analysis.stats import split_groups

    codes = group_codes(groups, groups.size)
    return split_groups(codes, labels.size, 0, strata=pair_counts(labels, codes)[codes] > 0)


def test_bad_input_raises_one_line_errors():
    labels = np.array([True, False, True, False])
    with pytest.raises(UserError, match="no problem has both"):
        auc_permutation(np.zeros((4, 2)), labels, np.array([0, 1, 0, 1]))
    with pytest.raises(UserError, match="null must be"):
        auc_permutation(np.zeros((4, 2)), labels, None, null="global")
    with pytest.raises(UserError, match="both correct and incorrect"):
        held_out_selection(np.zeros((4, 2)), labels, 1, np.array([0, 1, 0, 1]))
