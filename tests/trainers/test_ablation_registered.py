"""The ablation's registered tests (trainers/ablation/registered.py): the t p-value and Holm
against plain references, the half-learning-rate control's prediction on known curves, the
control arm's config, and the plan's outcome on planted ablations (primary found, secondary
corrected, control detected or not)."""

import random

import pytest

from tests.trainers.test_ablation import fake_ablation, t_cdf


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 100])
def test_t_p_value_matches_the_integrated_density(df):
    from trainers.ablation.registered import t_two_sided_p

    for t in (0.0, 0.3, 1.0, 2.0, 3.5, 8.0):
        want = 2 * (1 - t_cdf(t, df)) if t else 1.0
        assert t_two_sided_p(t, df) == pytest.approx(want, abs=2e-6), (t, df)
        assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)
    from attnrl.analysis.stats import t975

    assert t_two_sided_p(t975(df), df) == pytest.approx(0.05, abs=2e-5)


def test_holm_matches_its_definition():
    from trainers.ablation.registered import holm

    rng = random.Random(0)
    for _ in range(300):
        ps = {f"h{i}": rng.random() ** 3 for i in range(rng.randint(1, 6))}
        got = holm(ps)
        names = sorted(ps, key=ps.get)
        m = len(names)
        for rank, name in enumerate(names):  # max over the earlier steps of (m - j) p_(j)
            want = min(1.0, max((m - j) * ps[names[j]] for j in range(rank + 1)))
            assert got[name] == pytest.approx(want)
    assert holm({"a": 0.01, "b": 0.04, "c": None}) == {"a": 0.02, "b": 0.04}


def test_half_rate_prediction_on_known_curves():
    from trainers.ablation.registered import curve_area_between, predicted_control_diff

    linear = [(s, 0.4 + 0.01 * s) for s in range(0, 17, 4)]   # rises 1 point per step
    # AUC[0, 8] = 0.44, AUC[0, 16] = 0.48: half the rate predicts 4 points less
    assert curve_area_between(linear, 0, 8) == pytest.approx(0.44)
    assert predicted_control_diff(linear, 16) == pytest.approx(-0.04)
    flat = [(s, 0.5) for s in range(0, 17, 4)]
    assert predicted_control_diff(flat, 16) == pytest.approx(0.0)
    assert predicted_control_diff([(0, 0.4), (6, 0.5), (16, 0.6)], 16) is None  # no step 8
    assert predicted_control_diff(linear, 15) is None


def test_control_arm_is_uniform_at_half_the_learning_rate(tmp_path):
    from trainers.ablation import check_strategies, plan

    check_strategies(["uniform", "uniform_half_lr", "coupled"])
    base = {"model": "smollm2", "task": "chain_sum", "task_size": 8, "learning_rate": 3e-5,
            "max_steps": 4, "report_to": "none", "rollout_engine": "hf"}
    ev = {"num_problems": 4, "n": 1, "max_tokens": 8, "temperature": 0.6, "every": 2}
    runs = {r["strategy"]: r["config"] for r in
            plan(base, ev, ["uniform", "uniform_half_lr"], [0], tmp_path)}
    assert runs["uniform_half_lr"]["credit"] == "uniform"
    assert runs["uniform_half_lr"]["learning_rate"] == pytest.approx(1.5e-5)
    assert runs["uniform"]["learning_rate"] == pytest.approx(3e-5)
    same = {k: v for k, v in runs["uniform"].items() if k not in ("output_dir", "run_name",
                                                                   "learning_rate")}
    assert same == {k: runs["uniform_half_lr"][k] for k in same}


def test_registered_outcome_on_planted_ablations(tmp_path):
    """coupled +6 points on every seed: primary significant; random null: its secondary
    tests are not; the control -8: detected; the secondary p-values are Holm over the
    family (random final / AUC, coupled final)."""
    from trainers.ablation.registered import holm, paired_test

    rng = random.Random(8)
    base = [rng.uniform(0.35, 0.7) for _ in range(8)]
    arms = {"uniform": base,
            "coupled": [b + 0.06 + rng.gauss(0, 0.01) for b in base],
            "random": [b + rng.gauss(0, 0.01) for b in base],
            "uniform_half_lr": [b - 0.08 + rng.gauss(0, 0.01) for b in base]}
    summary = fake_ablation(tmp_path, arms)
    tests = summary["registered"]
    assert tests["primary"]["arm"] == "coupled" and tests["primary"]["metric"] == "auc"
    assert not tests["interim"] and tests["planned_seeds"] == 8
    assert tests["primary"]["significant"] and tests["primary"]["p"] < 1e-4
    family = {s["test"]: s for s in tests["secondary"]}
    assert set(family) == {"coupled:final", "random:final", "random:auc"}
    rows = {r["strategy"]: r for r in summary["table"]}
    raw = {k: paired_test(rows[k.split(":")[0]][f"diff_{k.split(':')[1]}"])["p"]
           for k in family}
    assert {k: s["p"] for k, s in family.items()} == pytest.approx(raw)
    assert {k: s["p_holm"] for k, s in family.items()} == pytest.approx(holm(raw))
    assert family["coupled:final"]["significant"]
    assert tests["control"]["detected"]
    from tests.trainers.test_ablation import format_table

    text = format_table(summary)
    assert "# PRIMARY (coupled - uniform, AUC, paired t over 8 seeds)" in text
    assert "coupled learns better than uniform" in text and "Holm over 3 tests" in text


def test_no_difference_needs_a_detected_control(tmp_path):
    rng = random.Random(9)
    base = [rng.uniform(0.35, 0.7) for _ in range(6)]
    null = [b + d for b, d in zip(base, (0.01, -0.01, 0.02, -0.02, 0.0, 0.005))]
    weak = [b + d for b, d in zip(base, (-0.05, 0.04, -0.03, 0.03, -0.02, 0.01))]
    from tests.trainers.test_ablation import format_table

    text = format_table(fake_ablation(tmp_path / "a", {"uniform": base, "coupled": null,
                                                        "uniform_half_lr": weak}))
    assert "the control was not detected: cannot decide" in text
    strong = [b - 0.1 + d for b, d in zip(base, (0.01, -0.01, 0.0, 0.01, -0.01, 0.0))]
    text = format_table(fake_ablation(tmp_path / "b", {"uniform": base, "coupled": null,
                                                        "uniform_half_lr": strong}))
    assert "no difference shown, at a budget that detected the control" in text


def test_primary_test_keeps_its_level_under_the_null():
    """The primary test alone at alpha 0.05 over simulated 10-seed null ablations: about 5%
    rejections (binomial sd 0.49 points over 2000)."""
    from trainers.ablation import paired_t_interval
    from trainers.ablation.registered import paired_test

    rng = random.Random(12)
    trials = 2000
    rejected = sum(paired_test(paired_t_interval([rng.gauss(0, 0.03) for _ in range(10)]))["p"]
                   < 0.05 for _ in range(trials))
    assert 0.035 <= rejected / trials <= 0.065


@pytest.mark.parametrize("effect, sd, n", [(0.03, 0.028, 10), (0.03, 0.04, 10),
                                           (0.03, 0.02, 5), (0.0, 0.03, 10)])
def test_power_at_matches_a_simulated_paired_t_test(effect, sd, n):
    """The normal-approximation power against the rejection rate of the real paired t test
    on 4000 simulated ablations (binomial sd <= 0.8 points; the approximation is within 3)."""
    from trainers.ablation import paired_t_interval
    from trainers.ablation.registered import paired_test, power_at

    rng = random.Random(int(1000 * sd) + n)
    trials = 4000
    rate = sum(paired_test(paired_t_interval([rng.gauss(effect, sd) for _ in range(n)]))["p"]
               < 0.05 for _ in range(trials)) / trials
    assert power_at(effect, sd, n) == pytest.approx(rate, abs=0.03)


def test_power_statement_follows_the_plan(tmp_path):
    """The table states the primary test's power at 3 AUC points from the observed sd, and
    says UNDERPOWERED above the plan's sd of 3.2 points."""
    from tests.trainers.test_ablation import format_table

    rng = random.Random(10)
    base = [rng.uniform(0.35, 0.7) for _ in range(10)]
    control = [b - 0.06 + rng.gauss(0, 0.01) for b in base]
    for sd, underpowered in ((0.01, False), (0.06, True)):
        coupled = [b + rng.gauss(0, sd) for b in base]
        summary = fake_ablation(tmp_path / str(sd), {"uniform": base, "coupled": coupled,
                                                      "uniform_half_lr": control})
        power = summary["registered"]["primary"]["power"]
        assert power["seeds"] == 10 and power["underpowered"] is underpowered
        text = format_table(summary)
        line = next(x for x in text.splitlines() if x.startswith("# power of the primary"))
        assert f"about {100 * power['power']:.0f}% with 10 seeds" in line
        assert ("UNDERPOWERED" in line) is underpowered


def test_an_interim_table_gives_no_verdict(tmp_path):
    """Before the planned seeds (here 4 of 6 paired: seeds 4 and 5 have only uniform) the
    table gives intervals as progress, no test, verdict or power judgement (the plan's
    rule); at the planned count the same data gets them."""
    from tests.trainers.test_ablation import format_table

    rng = random.Random(11)
    base = [rng.uniform(0.35, 0.7) for _ in range(6)]
    arms = {"uniform": base, "coupled": [b + 0.06 + rng.gauss(0, 0.01) for b in base],
            "uniform_half_lr": [b - 0.08 + rng.gauss(0, 0.01) for b in base]}
    full = fake_ablation(tmp_path / "full", arms)
    assert not full["registered"]["interim"]
    assert "coupled learns better than uniform" in format_table(full)
    from tests.trainers.test_ablation import SETTINGS, write_run
    from trainers.ablation import summarize

    runs, root = [], tmp_path / "partial"
    for seed in range(6):
        for strategy, values in arms.items():
            run_dir = root / f"{strategy}-seed{seed}"
            if strategy == "uniform" or seed < 4:  # the others not finished yet
                write_run(run_dir, values[seed])
            runs.append({"strategy": strategy, "seed": seed, "dir": run_dir})
    write_run(root / "untrained", 0.3)
    partial = summarize(runs, SETTINGS, {"strategy": "untrained", "seed": None,
                                         "dir": root / "untrained", "train": False})
    assert partial["registered"]["interim"]
    text = format_table(partial)
    assert "so far" in text and "tested at 6 seeds, not before" in text
    for word in ("learns better", "p = ", "DETECTED", "CANNOT DECIDE", "UNDERPOWERED",
                 "secondary (Holm", "cannot decide"):
        assert word not in text, word
    rows = {r["strategy"]: r for r in partial["table"]}
    assert rows["coupled"]["verdict"] == "INTERIM (4 of 6 seeds): no verdict"
