"""Report sections (attnrl.analysis.report_data) on planted inputs: receiver heads are
ranked only from responses with >= MIN_SENTENCE_SCORES vertical scores (a planted heavy-
tailed head tops the ranking and is claimed beyond its positional profile; too few
sentences: 'not measurable at this length' in the JSON, the summary and the HTML); the QK
section reports within-problem AUCs first, the T = 1 log-prob and length baselines, and
the held-out paired differences (against each baseline in its better held-out
direction)."""

from types import SimpleNamespace

import numpy as np
import pytest

from attnrl.analysis.report import _receiver_html
from attnrl.analysis.report_data import qk_section, receiver_section
from attnrl.analysis.summary import receiver_line, summary_lines
from attnrl.errors import UserError
from attnrl.signals.receiver import MIN_SENTENCE_SCORES
from tests.attnrl.analysis.test_receivers import PLANTED, simulated


def test_planted_receiver_head_tops_the_ranking_at_enough_sentences():
    results = simulated(0, responses=6, sentences=16, layers=3, heads=4, planted=True)
    assert min(r.extra["vertical_scores"] for r in results) >= MIN_SENTENCE_SCORES
    r = receiver_section(results, np.arange(6) // 2, [[1, 2]], [], top_k=5)
    assert r["measurable"] and r["responses"] == 6
    assert r["top_heads"][0] == list(PLANTED)
    assert r["top_kurtosis"][0] > r["top_kurtosis"][1] + 1.0
    assert r["claim"]["heads"] == [list(PLANTED)]                   # beyond its position
    assert r["overlap_with_global_heads"] == 1
    assert "L1H2" in receiver_line(r) and "receiver heads exist" in receiver_line(r)
    assert "receivers.png" in _receiver_html({"receivers": r})


def test_too_few_sentences_is_not_measurable():
    results = simulated(0, responses=5, sentences=6, layers=3, heads=4, spread=1)
    # 2 vertical scores: the excess kurtosis of every head is -2, whatever the attention
    assert np.allclose(np.stack([r.receiver for r in results]), -2.0)
    r = receiver_section(results, None, [], [])
    assert not r["measurable"] and r["responses"] == 0 and "top_heads" not in r
    assert "not measurable at this length" in r["note"]
    assert "not measurable at this length" in receiver_line(r)
    assert "not measurable at this length" in _receiver_html({"receivers": r})


def test_only_long_responses_count_and_repeats_are_reported():
    long = simulated(0, responses=5, sentences=15, layers=3, heads=4, planted=True)
    short = simulated(1, responses=4, sentences=7, layers=3, heads=4, spread=1)
    none = SimpleNamespace(receiver=None, receiver_profile=None, extra={})
    results = short + [none] + long
    r = receiver_section(results, None, [], [], top_k=3, repeats=[0] * 9 + [3, 0])
    assert r["responses"] == 5 and r["responses_with_sentences"] == 9
    assert r["top_heads"][0] == list(PLANTED)
    mean = np.nanmean(np.stack([x.receiver for x in long]), 0)
    assert np.allclose(np.array(r["mean_kurtosis"]), mean)
    assert r["repeated_sentences_dropped"] == 3 and r["responses_with_repeats"] == 1
    assert "3 repeated sentences dropped in 1 responses" in receiver_line(r)


def test_qk_section_reports_within_first_and_both_baselines():
    rng = np.random.default_rng(0)
    L, H, problems, samples = 2, 3, 40, 4
    groups = np.repeat(np.arange(problems), samples)
    labels = rng.random(groups.size) < 0.5
    results = []
    for i in range(groups.size):
        score = rng.normal(size=(L, H))                                 # unrelated heads ...
        score[1, 2] += 1.5 * labels[i]                                  # ... and one that knows
        n = int(20 + 10 * (~labels[i]) + rng.integers(0, 3))            # correct: shorter
        results.append(SimpleNamespace(answer_score=score, logprobs=rng.normal(size=n) - 2,
                                       waad_heads=np.zeros((L, H, n))))
    qk = qk_section(results, labels, groups, H, 2, 300, 200, 0)
    assert qk["within"]["best_head"] == [1, 2] and qk["within"]["best_p_fwer"] < 0.01
    assert np.array(qk["within"]["auc"]).shape == (L, H)
    assert "across" in qk and "labels permuted within problems" in qk["within"]["null"]
    assert set(qk["baselines"]) == {"logprob", "length"}
    assert qk["baselines"]["length"]["within"]["auc"] < 0.1           # shorter = correct
    held = qk["held_out"]
    assert held["selected"][0] == [1, 2] and held["measurable"]
    assert held["baselines"]["length"]["direction"] == "lower = correct"
    assert len(held["baselines"]["logprob"]["heads_minus_reference_ci"]) == 2
    assert held["test"]["p_fwer"][0] < 0.01 and len(held["test"]["p_fwer"]) == 2
    assert int(qk["_order"][0]) == 1 * H + 2


def test_a_report_of_the_earlier_statistics_is_refused_with_one_line():
    with pytest.raises(UserError, match="earlier statistics; re-run"):
        summary_lines({"model": "m", "coupling": {}})
