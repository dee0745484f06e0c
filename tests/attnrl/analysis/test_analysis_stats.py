"""Statistics of `attnrl analyze` against brute-force references on synthetic signals:
counting by loops, an explicit shuffle null, pair-counting AUC; a planted coupling and a
planted QK head are found, shuffled signals and pure noise are not."""

import math

import numpy as np
import torch

from attnrl.analysis.stats import (
    auc_columns,
    auc_permutation,
    compare_means,
    coupling,
    held_out_selection,
    near_after,
    peak_mask,
    split_groups,
)


def ref_near(source, k):
    R, N = source.shape
    return torch.tensor([[any(source[r, u] for u in range(max(0, s - k), s + 1))
                          for s in range(N)] for r in range(R)])


def synthetic(seed, responses=60, length=80, p=0.1, k=3, planted=True):
    """WAAD-like and FAI-like signals; with `planted`, each FAI peak is put 0..k tokens after
    a WAAD peak (where the permutation null would put it only by chance)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (responses,), generator=gen)
    eligible = torch.arange(length)[None, :] < lengths[:, None]
    waad = torch.rand(responses, length, generator=gen)
    fai = torch.rand(responses, length, generator=gen)
    if planted:
        source = peak_mask(waad, eligible, p)
        for r in range(responses):
            for u in source[r].nonzero().flatten().tolist():
                s = min(u + int(torch.randint(0, k + 1, (1,), generator=gen)),
                        int(lengths[r]) - 1)
                fai[r, s] += 2.0
    return waad, fai, eligible


def test_near_after_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    source = torch.rand(7, 23, generator=gen) < 0.15
    for k in (0, 1, 3, 30):
        assert torch.equal(near_after(source, k), ref_near(source, k))


def test_coupling_counts_and_chance_match_brute_force_shuffles():
    waad, fai, eligible = synthetic(1, responses=12, length=40, planted=False)
    source, target = peak_mask(waad, eligible, 0.1), peak_mask(fai, eligible, 0.1)
    result = coupling(target, source, eligible, k=3, permutations=20000, bootstrap=200)
    near = ref_near(source, 3)
    hits = sum(bool(near[r, s]) for r, s in target.nonzero().tolist())
    assert result["coupled_peaks"] == hits
    assert result["target_peaks"] == int(target.sum())
    assert result["observed"] == hits / int(target.sum())
    # explicit permutations of the peak positions within each response
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(4000):
        count = 0
        for r in range(target.shape[0]):
            positions = np.flatnonzero(eligible[r].numpy())
            m = int(target[r].sum())
            placed = rng.permutation(positions)[:m]
            count += int(near[r, placed].sum())
        draws.append(count / int(target.sum()))
    draws = np.array(draws)
    assert abs(result["chance"] - draws.mean()) < 0.01
    assert abs(result["chance_exact"] - draws.mean()) < 0.01
    lo, hi = result["chance_range"]
    assert abs(lo - np.quantile(draws, 0.025)) <= 0.04 and abs(hi - np.quantile(draws, 0.975)) <= 0.04
    p_ref = (1 + (draws >= result["observed"]).sum()) / (1 + draws.size)
    assert abs(result["p_value"] - p_ref) < 0.03


def test_planted_coupling_is_detected():
    waad, fai, eligible = synthetic(2, planted=True)
    source, target = peak_mask(waad, eligible, 0.1), peak_mask(fai, eligible, 0.1)
    result = coupling(target, source, eligible, k=3, permutations=5000, bootstrap=500)
    assert result["ratio"] > 1 and result["ratio_ci"][0] > 1
    assert result["p_value"] < 0.01
    assert result["observed_ci"][0] > result["chance"]


def test_shuffled_signals_give_ratio_one():
    for seed in range(3):
        waad, fai, eligible = synthetic(10 + seed, planted=True)
        # shuffle the FAI values within each response: the planted relation is gone
        gen = torch.Generator().manual_seed(seed)
        shuffled = fai.clone()
        for r in range(fai.shape[0]):
            idx = eligible[r].nonzero().flatten()
            shuffled[r, idx] = fai[r, idx[torch.randperm(idx.numel(), generator=gen)]]
        source, target = peak_mask(waad, eligible, 0.1), peak_mask(shuffled, eligible, 0.1)
        result = coupling(target, source, eligible, k=3, permutations=5000, bootstrap=1000,
                          seed=seed)
        lo, hi = result["ratio_ci"]
        assert lo <= 1 <= hi, (seed, result["ratio"], lo, hi)
        assert 0.7 < result["ratio"] < 1.3
        assert result["p_value"] > 0.01


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(30, 4)).astype(float)       # ties on purpose
    labels = rng.random(30) < 0.4
    ref = []
    for h in range(4):
        pos, neg = scores[labels, h], scores[~labels, h]
        ref.append(sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (pos.size * neg.size))
    assert np.allclose(auc_columns(scores, labels), ref, atol=1e-12)


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
    perm = auc_permutation(scores, labels, permutations=300, rng=np.random.default_rng(1))
    assert perm["p_fwer"][7] < 0.01
    assert int(np.argmax(np.abs(np.array(perm["auc"]) - 0.5))) == 7


def test_pure_noise_heads_have_no_held_out_interval_excluding_half():
    for seed in range(3):
        scores, labels, groups = planted_heads(seed + 20, planted=None)
        held = held_out_selection(scores, labels, top_k=4, groups=groups, seed=seed, draws=400)
        for lo, hi in held["held_out_ci"]:
            assert lo <= 0.5 <= hi, (seed, held["held_out_auc"], held["held_out_ci"])
        perm = auc_permutation(scores, labels, permutations=200, rng=np.random.default_rng(seed))
        assert min(perm["p_fwer"]) > 0.01


def test_split_groups_keeps_problems_whole():
    groups = np.repeat(np.arange(9), 3)
    a, b = split_groups(groups, groups.size, seed=3)
    assert set(groups[a]).isdisjoint(groups[b]) and a.size + b.size == groups.size


def test_compare_means_values():
    values = np.array([1.0, 2.0, 3.0, 10.0, 12.0])
    labels = np.array([False, False, False, True, True])
    out = compare_means(values, labels, draws=300)
    assert out["correct"]["mean"] == 11.0 and out["incorrect"]["mean"] == 2.0
    assert math.isclose(out["difference"], 9.0)
    lo, hi = out["difference_ci"]
    assert lo <= 9.0 <= hi
