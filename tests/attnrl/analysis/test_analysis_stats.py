"""Shared statistics of `attnrl analyze` (attnrl.analysis.stats): problem halves (plain and
stratified), bootstrap counts against explicit resamples, means and differences.
Peak coupling: test_coupling.py; AUCs: test_auc.py."""

import math

import numpy as np
import pytest

from attnrl.analysis.stats import (
    bootstrap_counts,
    bootstrap_rows,
    compare_means,
    permutation_p,
    split_groups,
)
from attnrl.errors import UserError


def test_split_groups_keeps_problems_whole():
    groups = np.repeat(np.arange(9), 3)
    a, b = split_groups(groups, groups.size, seed=3)
    assert set(groups[a]).isdisjoint(groups[b]) and a.size + b.size == groups.size


def test_stratified_split_shares_each_stratum_between_halves():
    groups = np.repeat(np.arange(20), 4)
    strata = np.isin(groups, [2, 5, 11, 17, 19])            # 5 problems with both outcomes
    for seed in range(5):
        a, b = split_groups(groups, groups.size, seed, strata=strata)
        assert set(groups[a]).isdisjoint(groups[b]) and a.size + b.size == groups.size
        assert {len(set(groups[a][strata[a]])), len(set(groups[b][strata[b]]))} == {2, 3}
    with pytest.raises(UserError, match="constant within"):
        split_groups(groups, groups.size, 0, strata=np.arange(80) % 2 == 0)


def test_bootstrap_counts_equal_explicit_resamples():
    groups = np.repeat(np.arange(7), [1, 2, 3, 1, 4, 2, 2])
    counts = bootstrap_counts(7, 50, np.random.default_rng(4))
    rows = bootstrap_rows(groups, groups.size, 50, np.random.default_rng(4))
    for c, idx in zip(counts, rows):
        assert c.sum() == 7
        assert np.array_equal(np.bincount(groups[idx], minlength=7),
                              c * np.bincount(groups))


def test_permutation_p_counts_ties_as_exceeding():
    null = np.array([0.1, 0.5, 0.5, 0.9])
    assert permutation_p(null, 0.5, 4) == (1 + 3) / 5
    assert permutation_p(null, 1.0, 4) == 1 / 5


def test_compare_means_values():
    values = np.array([1.0, 2.0, 3.0, 10.0, 12.0])
    labels = np.array([False, False, False, True, True])
    out = compare_means(values, labels, draws=300)
    assert out["correct"]["mean"] == 11.0 and out["incorrect"]["mean"] == 2.0
    assert math.isclose(out["difference"], 9.0)
    lo, hi = out["difference_ci"]
    assert lo <= 9.0 <= hi


def test_t_interval_matches_its_definition():
    """The library's one t interval: mean +- t_{0.975, m-1} sd / sqrt(m) (scipy-free
    reference: the t quantile table checked in tests/trainers/test_ablation.py)."""
    import math
    import random
    import statistics

    from attnrl.analysis.stats import T975, t_interval

    rng = random.Random(3)
    for _ in range(200):
        values = [rng.gauss(1.0, 2.0) for _ in range(rng.randint(2, 25))]
        got = t_interval(values)
        half = T975[len(values) - 2] * statistics.stdev(values) / math.sqrt(len(values))
        assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert got["half_width"] == pytest.approx(half, rel=1e-12)
        assert got["low"] == pytest.approx(got["mean"] - half, abs=1e-12)
    assert t_interval([0.3])["low"] is None and t_interval([0.3])["mean"] == 0.3
    assert t_interval([])["mean"] is None
