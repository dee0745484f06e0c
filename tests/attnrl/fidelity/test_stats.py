"""Fidelity statistics against plain reference implementations of their definitions, and the
calibration of the permutation test on data with the structure real responses have.

S = sum_j w_j |D_j| / (mean_j w_j sum_j |D_j|), w_j the mean gamma of chunk j; rho =
Spearman(w, |D|); the null places the same gamma values at random within the response."""

import itertools
import math

import numpy as np
import pytest

from attnrl.fidelity import stats
from attnrl.fidelity.report import CEILING, ORACLE, response_records, summarize
from attnrl.fidelity.values import CutResponse

TOL = 1e-12   # float64 throughout: the vectorized code and the loops agree to rounding


def reference_share(gamma, bounds, abs_d):
    w = [sum(gamma[bounds[j]:bounds[j + 1]]) / (bounds[j + 1] - bounds[j])
         for j in range(len(bounds) - 1)]
    total = sum(abs_d)
    return sum(wj * dj for wj, dj in zip(w, abs_d)) / (sum(w) / len(w) * total)


def reference_ranks(x):
    out = [0.0] * len(x)
    for i, v in enumerate(x):
        below = sum(1 for u in x if u < v)
        ties = sum(1 for u in x if u == v)
        out[i] = below + (ties - 1) / 2
    return out


def reference_spearman(a, b):
    ra, rb = reference_ranks(list(a)), reference_ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den > 0 else 0.0


@pytest.mark.parametrize("length,k", [(3, 2), (17, 4), (64, 6), (301, 10)])
def test_share_and_rank_correlation_equal_their_definitions(length, k):
    rng = np.random.default_rng(length)
    for _ in range(20):
        cuts = sorted(rng.choice(np.arange(1, length), size=min(k, length) - 1, replace=False))
        bounds = [0, *map(int, cuts), length]
        gamma = rng.choice([1.0, 1.25, 1.5], size=length)
        abs_d = np.abs(rng.choice([0.0, 0.125, 0.25, 0.5, 1.0], size=len(bounds) - 1))
        if abs_d.sum() == 0:
            abs_d[0] = 0.5
        s, rho = stats.response_scores(gamma, bounds, abs_d)
        assert abs(s - reference_share(list(gamma), bounds, list(abs_d))) < TOL
        w = [np.mean(gamma[bounds[j]:bounds[j + 1]]) for j in range(len(bounds) - 1)]
        assert abs(rho - reference_spearman(w, abs_d)) < TOL


def test_uniform_and_constant_credit_give_share_one_and_rho_zero():
    bounds, abs_d = [0, 4, 9, 10], np.array([0.1, 0.7, 0.2])
    for value in (1.0, 1.5, 0.3):
        s, rho = stats.response_scores(np.full(10, value), bounds, abs_d)
        assert s == pytest.approx(1.0, abs=1e-15) and rho == 0.0
    assert math.isnan(stats.decisive_share(np.ones(3), np.zeros(3)))


def test_permutation_means_equal_the_mean_over_every_placement():
    gamma = np.array([1.5, 1.5, 1.0, 1.0, 1.0, 1.2])
    bounds, abs_d = [0, 2, 3, 6], np.array([0.5, 0.0, 0.25])
    exact_s, exact_rho = [], []
    for perm in itertools.permutations(range(6)):
        s, rho = stats.response_scores(gamma[list(perm)], bounds, abs_d)
        exact_s.append(s)
        exact_rho.append(rho)
    s, rho = stats.permutation_means(gamma, bounds, abs_d, 40000, np.random.default_rng(0))
    # Monte-Carlo error of 40000 draws: sd(S) / 200 ~ 0.001
    assert s == pytest.approx(np.mean(exact_s), abs=4e-3)
    assert rho == pytest.approx(np.mean(exact_rho), abs=1e-2)


def test_cluster_mean_is_a_t_interval_over_problem_means():
    values = np.array([1.0, 3.0, 2.0, 2.0, 10.0, 4.0])
    groups = np.array([0, 0, 1, 1, 2, 2])                 # problem means 2, 2, 7
    out = stats.cluster_mean(values, groups)
    means = np.array([2.0, 2.0, 7.0])
    half = 4.3027 * means.std(ddof=1) / math.sqrt(3)
    assert out["mean"] == pytest.approx(11 / 3) and out["problems"] == 3
    assert out["low"] == pytest.approx(11 / 3 - half) and out["high"] == pytest.approx(11 / 3 + half)


def test_holm_matches_its_definition():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03)
    assert adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06)           # monotone: max(0.04, 0.06)
    assert math.isnan(adjusted["d"])


def test_sign_flip_p_is_exact_for_a_symmetric_null():
    rng = np.random.default_rng(1)
    ps = [stats.sign_flip_p(rng.normal(size=40), np.arange(40), draws=400, seed=i)
          for i in range(400)]
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.08
    assert stats.sign_flip_p(np.full(30, 0.2) + rng.normal(0, 0.05, 30), np.arange(30)) < 0.001


# ---- planted structure and calibration, through the records and the summary ------------

def _cut(problem, bounds, values, trials=8, correct=None):
    """A cut response whose estimated values are `values` (V at b_0..b_{K-1}, in 1/trials
    steps) and whose outcome is V(b_K) = correct."""
    wins = [round(v * trials) for v in values]
    return CutResponse(problem=problem, prompt_ids=[1], response_ids=list(range(bounds[-1])),
                       correct=bool(correct), bounds=list(bounds), successes=wins,
                       trials=[trials] * len(wins), half_successes=[w // 2 for w in wins])


def _planted(problems=24, seed=0, shift=0):
    """Responses of 4 chunks in which one chunk (random per response) moves V from ~0.1 to
    ~0.9; a strategy that amplifies the tokens of that chunk, shifted by `shift` chunks."""
    rng = np.random.default_rng(seed)
    cuts, gamma = [], []
    for p in range(problems):
        for _ in range(2):
            sizes = rng.integers(5, 20, size=4)
            bounds = [0, *np.cumsum(sizes).tolist()]
            decisive = int(rng.integers(0, 4))
            v = [0.125 if j <= decisive else 0.875 for j in range(4)]
            cuts.append(_cut(p, bounds, v, correct=True))
            g = np.ones(bounds[-1])
            marked = (decisive + shift) % 4
            g[bounds[marked]:bounds[marked + 1]] = 1.5
            gamma.append(g)
    return cuts, gamma


def _summary(cuts, gammas, permutations=100, seed=0):
    rows = response_records(cuts, gammas, 1.5, permutations, seed)
    return summarize(rows, list(gammas), {"seed": seed, "qk_heads": {}},
                     calibration_redraws=0, test_draws=300)


def test_planted_decisive_chunk_is_recovered_and_a_shifted_strategy_is_not():
    cuts, aligned = _planted()
    _, shifted = _planted(shift=1)
    summary = _summary(cuts, {"aligned": aligned, "shifted": shifted,
                              "uniform": [np.ones(len(c.response_ids)) for c in cuts]})
    table = summary["strategies"]
    assert table["aligned"]["verdict"] == "beats its permutation and its position profile"
    assert table["aligned"]["S"]["low"] > 1.2       # ceiling here: 1.5 x 0.75 / (1.125 x 0.875) ~ 1.14-1.33
    assert not table["shifted"]["verdict"].startswith("beats")
    assert table["shifted"]["S"]["high"] < 1.0            # credit where nothing happened
    assert summary["controls"]["uniform_S_is_1"] and summary["controls"]["ceiling_on_top"]
    # the ceiling is the best S of any gamma in [1, 1.5]: here exactly the aligned strategy's
    assert table[CEILING]["S"]["mean"] == pytest.approx(table["aligned"]["S"]["mean"])
    assert 1.0 < table[ORACLE]["S"]["mean"] <= table[CEILING]["S"]["mean"]
    assert summary["recommended"] == ["aligned"] and summary["position_only"] == []


def test_all_zero_responses_are_set_aside_and_counted():
    flat = _cut(0, [0, 3, 6], [1.0, 1.0], correct=True)
    moving = _cut(1, [0, 3, 6], [0.0, 0.5], correct=True)
    summary = _summary([flat, moving], {"uniform": [np.ones(6), np.ones(6)]})
    assert summary["set_aside_all_D_zero"] == 1 and summary["kept"] == 1


def _null_dataset(rng, problems=32, per_problem=2, k=8):
    """Responses with the structure real ones have, and no link between credit and D:
    true values follow a random walk ending in the outcome (so the last step is often the
    largest: a position trend in |D|), estimated from k continuations (binomial noise);
    the strategy marks runs of consecutive tokens (runs of peaks) placed uniformly, with a
    random number of runs per response (sinks / no sinks alike)."""
    cuts, gamma = [], []
    for p in range(problems):
        start = rng.uniform(0.1, 0.9)
        for _ in range(per_problem):
            chunks = int(rng.integers(2, 6))
            sizes = rng.integers(3, 25, size=chunks)
            bounds = [0, *np.cumsum(sizes).tolist()]
            true = [start]
            for _ in range(chunks - 1):
                true.append(float(np.clip(true[-1] + rng.normal(0, 0.15), 0, 1)))
            correct = rng.random() < true[-1]
            wins = rng.binomial(k, true)
            cuts.append(CutResponse(problem=p, prompt_ids=[1], response_ids=list(range(
                bounds[-1])), correct=bool(correct), bounds=bounds, successes=wins.tolist(),
                trials=[k] * chunks, half_successes=rng.binomial(k // 2, true).tolist()))
            g = np.ones(bounds[-1])
            for _ in range(int(rng.integers(1, 4))):
                length = int(rng.integers(1, 6))
                at = int(rng.integers(0, bounds[-1]))
                g[at:at + length] = 1.5
            gamma.append(g)
    return cuts, gamma


@pytest.mark.slow
def test_permutation_test_rejects_at_nominal_rate_on_structured_null_data():
    rng = np.random.default_rng(2026)
    rejections, position_rejections, repetitions = 0, 0, 200
    for rep in range(repetitions):
        cuts, gamma = _null_dataset(rng)
        summary = _summary(cuts, {"null_strategy": gamma}, permutations=50, seed=rep)
        entry = summary["strategies"]["null_strategy"]
        rejections += entry["S_vs_perm"]["p_holm"] < 0.05
        position_rejections += entry["S_vs_position"]["p_holm"] < 0.05
    # nominal 5%; the binomial sd at 200 repetitions is 1.5 points
    assert rejections / repetitions <= 0.06, rejections
    assert position_rejections / repetitions <= 0.06, position_rejections


def test_credit_at_a_fixed_position_beats_its_permutation_but_not_its_position_profile():
    """A first-token sink: every response amplifies its first tokens, and the first step is
    where V moves (the prompt alone is uncertain, the first chunk settles it), with no link
    between this response's credit and its own D beyond position. The permutation null
    credits the strategy; the position null does not."""
    rng = np.random.default_rng(7)
    cuts, gamma = [], []
    for p in range(40):
        for _ in range(2):
            sizes = rng.integers(4, 15, size=4)
            bounds = [0, *np.cumsum(sizes).tolist()]
            jump = rng.uniform(0.3, 0.7)
            v = [0.5, 0.5 + jump * rng.choice([-1, 1]) * 0.5 * rng.uniform(0.5, 1.5)]
            v += [v[-1] + rng.normal(0, 0.05) for _ in range(2)]
            v = [float(np.clip(round(x * 8) / 8, 0, 1)) for x in v]
            cuts.append(_cut(p, bounds, v, correct=v[-1] > 0.5))
            g = np.ones(bounds[-1])
            g[:3] = 1.5                           # the sink: the first tokens, always
            gamma.append(g)
    summary = _summary(cuts, {"sink": gamma})
    entry = summary["strategies"]["sink"]
    assert entry["S_vs_perm"]["p_holm"] < 0.05 and entry["S_vs_perm"]["mean"] > 0
    assert entry["S_vs_position"]["p_holm"] >= 0.05
    assert entry["verdict"] == "beats its permutation (not beyond its position profile)"
    assert summary["recommended"] == [] and summary["position_only"] == ["sink"]


def test_null_calibration_on_a_runs_own_data_is_near_nominal():
    """The summary's built-in calibration: random credit redrawn on the run's own D (here the
    structured null data) is rejected at about the nominal 5% by both tests."""
    from attnrl.fidelity.report import null_calibration

    cuts, gamma = _null_dataset(np.random.default_rng(5))
    rows = response_records(cuts, {"x": gamma}, 1.5, 20, 0)
    out = null_calibration(rows, 0.4, 1.5, redraws=60, seed=1, permutations=20)
    assert out["redraws"] == 60
    for key in ("permutation", "position"):
        # binomial sd of a 5% rate over 60 redraws: 2.8 points
        assert out[key]["rejection_rate"] <= 0.12, (key, out[key])
    assert null_calibration(rows, 0.4, 1.5, redraws=0)["redraws"] == 0


def test_exchange_test_p_equals_the_exact_enumeration():
    own = np.array([1.2, 0.9])
    donors = np.array([[1.0, 1.1], [1.05, 0.95]])
    groups = np.array([0, 1])
    values = np.concatenate([own[:, None], donors], 1)
    t_obs = np.mean(own - donors.mean(1))
    stats_null = []
    for i in range(3):
        for j in range(3):
            picks = [values[0, i] - (values[0].sum() - values[0, i]) / 2,
                     values[1, j] - (values[1].sum() - values[1, j]) / 2]
            stats_null.append(np.mean(picks))
    exact = np.mean(np.abs(stats_null) >= abs(t_obs) - 1e-12)
    p = stats.exchange_test_p(own, donors, groups, 20000, np.random.default_rng(2))
    assert p == pytest.approx(exact, abs=0.01)


@pytest.mark.slow
def test_randomization_tests_are_calibrated_on_skewed_null_data():
    """Few problems (12), short responses, one decisive chunk: the per-response differences
    are skewed, so neither test is exact by symmetry; both keep their level."""
    rng = np.random.default_rng(11)
    rejected = {"perm": 0, "position": 0}
    reps = 200
    for _ in range(reps):
        gammas, bounds, abs_d, groups = [], [], [], []
        for p in range(12):
            n = int(rng.integers(3, 8))
            cut = sorted(rng.choice(np.arange(1, n), size=min(2, n - 1), replace=False))
            b = [0, *map(int, cut), n]
            d = np.zeros(len(b) - 1)
            d[-1] = 1.0                                       # the last chunk decides
            g = np.ones(n)
            g[rng.choice(n, size=math.ceil(0.4 * n), replace=False)] = 1.5
            gammas.append(g)
            bounds.append(b)
            abs_d.append(d)
            groups.append(p)
        groups = np.array(groups)
        base = np.array([stats.permutation_means(g, b, d, 400, rng)[0]
                         for g, b, d in zip(gammas, bounds, abs_d)])
        own = np.array([stats.response_scores(g, b, d)[0]
                        for g, b, d in zip(gammas, bounds, abs_d)])
        rejected["perm"] += stats.sign_flip_p(own - base, groups, 2000,
                                              int(rng.integers(1 << 30))) < 0.05
        donors = np.array([[stats.response_scores(
            stats.resample_profile(gammas[k], bounds[i][-1]), bounds[i], abs_d[i])[0]
            for k in range(12) if k != i][:8] for i in range(12)])
        # under the position null the own gamma is one more draw like the donors'
        rejected["position"] += stats.exchange_test_p(own, donors, groups, 200, rng) < 0.05
    for key, count in rejected.items():
        # nominal 5%: binomial sd over 200 repetitions is 1.5 points
        assert count / reps <= 0.08, (key, count)
