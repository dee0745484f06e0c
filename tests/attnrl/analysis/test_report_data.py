"""Report sections (attnrl.analysis.report_data) on planted inputs: receiver heads are
ranked only from responses with >= MIN_SENTENCE_SCORES vertical scores (a planted heavy-
tailed head tops the ranking; too few sentences: 'not measurable at this length' in the
JSON, the summary and the HTML); the QK section reports within-problem AUCs first, the
T = 1 log-prob and length baselines, and the held-out paired differences."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnrl.analysis.report import _receiver_html
from attnrl.analysis.report_data import qk_section, receiver_section
from attnrl.analysis.summary import receiver_line, summary_lines
from attnrl.errors import UserError
from attnrl.signals.receiver import MIN_SENTENCE_SCORES, head_kurtosis

PLANTED = (1, 2)


def receiver_kurtoses(n_sentences, responses=5, seed=0, layers=3, heads=4):
    """Per response: (L, H) kurtosis of random causal attention, where head PLANTED sends
    every later sentence's attention to one early sentence (a heavy-tailed receiver)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(responses):
        lengths = torch.randint(1, 5, (n_sentences,), generator=gen).tolist()
        edges = np.cumsum([0] + lengths).tolist()
        spans, n = list(itertools.pairwise(edges)), edges[-1]
        logits = torch.randn(layers * heads, n, n, generator=gen, dtype=torch.float64)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        attn = logits.masked_fill(~causal, float("-inf")).softmax(-1).reshape(layers, heads, n, n)
        target = int(torch.randint(0, max(1, n_sentences - 5), (1,), generator=gen))
        a, b = spans[target]
        spiky = attn[PLANTED].clone()
        spiky[min(n - 1, spans[min(target + 4, n_sentences - 1)][0]):, a:b] += 5.0
        attn[PLANTED] = spiky / spiky.sum(-1, keepdim=True)
        out.append(head_kurtosis(attn, spans).numpy())
    return out, [n_sentences - 4] * responses


def test_planted_receiver_head_tops_the_ranking_at_enough_sentences():
    kurt, counts = receiver_kurtoses(16)
    assert counts[0] >= MIN_SENTENCE_SCORES
    r = receiver_section(kurt, counts, [[1, 2]], [], top_k=5)
    assert r["measurable"] and r["responses"] == 5
    assert r["top_heads"][0] == list(PLANTED)
    assert r["top_kurtosis"][0] > r["top_kurtosis"][1] + 1.0
    assert r["overlap_with_global_heads"] == 1
    assert "L1H2" in receiver_line(r) and "receivers.png" in _receiver_html({"receivers": r})


def test_too_few_sentences_is_not_measurable():
    kurt, counts = receiver_kurtoses(6)
    # 2 vertical scores: the excess kurtosis of every head is -2, whatever the attention
    assert np.allclose(np.stack(kurt), -2.0)
    r = receiver_section(kurt, counts, [], [])
    assert not r["measurable"] and r["responses"] == 0 and "top_heads" not in r
    assert "not measurable at this length" in r["note"]
    assert "not measurable at this length" in receiver_line(r)
    assert "not measurable at this length" in _receiver_html({"receivers": r})


def test_only_long_responses_count():
    long, long_counts = receiver_kurtoses(15, responses=3)
    short, short_counts = receiver_kurtoses(7, responses=4, seed=1)
    r = receiver_section(short + [None] + long, short_counts + [0] + long_counts, [], [],
                         top_k=3)
    assert r["responses"] == 3 and r["responses_with_sentences"] == 7
    assert r["top_heads"][0] == list(PLANTED)
    mean = np.nanmean(np.stack(long), 0)
    assert np.allclose(np.array(r["mean_kurtosis"]), mean)


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
    assert held["selected"][0] == [1, 2]
    assert held["baselines"]["length"]["direction"] == "lower = correct"
    assert len(held["baselines"]["logprob"]["heads_minus_baseline_ci"]) == 2
    assert int(qk["_order"][0]) == 1 * H + 2


def test_a_report_of_the_earlier_statistics_is_refused_with_one_line():
    with pytest.raises(UserError, match="earlier statistics; re-run"):
        summary_lines({"model": "m", "coupling": {}})
