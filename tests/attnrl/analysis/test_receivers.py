"""Receiver heads against their positional profile (attnrl.analysis.receivers) and repeated
sentences. Against plain references: the token profile (loops over sentences and tokens;
its sentence means are the vertical scores of attnrl.signals.receiver), the leave-one-out
positional kurtosis (loops), the simultaneous bound (explicitly resampled data sets).
Simulated attention (random causal logits per head): a first-token sink makes every head's
kurtosis look heavy-tailed (the earlier reading of 5.3-5.9) but gives no receiver claim;
a sentence read back by every later sentence, at a different place in each response, is
claimed, with or without a sink; too few responses: no claim either way. Tolerances:
exact quantities to 1e-9 (float64), the simulated claims as stated at each test."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnrl.analysis.receivers import (
    MIN_RECEIVER_RESPONSES,
    RECEIVER_MARGIN,
    positional_excess,
    receiver_claim,
    span_means,
    token_profile,
    unique_spans,
)
from attnrl.analysis.stats import bootstrap_counts, group_codes
from attnrl.signals.receiver import kurtosis, sentence_matrix, vertical_scores

PLANTED = (1, 2)


def sentence_rows(attention: torch.Tensor, spans) -> torch.Tensor:
    """(..., S, N): mean attention of the tokens of each sentence (queries) to each token."""
    avg = torch.zeros(len(spans), attention.shape[-1], dtype=attention.dtype)
    for i, (start, end) in enumerate(spans):
        avg[i, start:end] = 1.0 / (end - start)
    return avg @ attention


def simulated(seed, responses=20, sentences=16, layers=30, heads=9, sink=0.0, planted=False,
              spread=5):
    """Responses as the analysis forward returns them (SimpleNamespace: receiver (L, H)
    kurtosis, receiver_profile (L, H, n), extra) from random causal attention over
    sentences of 1-4 tokens (sentences + 0..spread-1 per response). sink: logit added to the first
    token for every query and head; planted: head PLANTED adds 5 to the attention of every
    token >= 4 sentences later to one early sentence (a different one per response)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(responses):
        count = sentences + int(torch.randint(0, spread, (1,), generator=gen))
        lengths = torch.randint(1, 5, (count,), generator=gen).tolist()
        edges = np.cumsum([0] + lengths).tolist()
        spans, n = list(itertools.pairwise(edges)), edges[-1]
        logits = torch.randn(layers * heads, n, n, generator=gen, dtype=torch.float64)
        logits[:, :, 0] += sink
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        attn = logits.masked_fill(~causal, -math.inf).softmax(-1).reshape(layers, heads, n, n)
        if planted:
            target = int(torch.randint(0, max(1, count - 5), (1,), generator=gen))
            a, b = spans[target]
            spiky = attn[PLANTED].clone()
            spiky[spans[min(target + 4, count - 1)][0]:, a:b] += 5.0
            attn[PLANTED] = spiky / spiky.sum(-1, keepdim=True)
        vert = vertical_scores(sentence_matrix(attn, spans))
        out.append(SimpleNamespace(
            receiver=kurtosis(vert).numpy(),
            receiver_profile=token_profile(sentence_rows(attn, spans), spans).numpy(),
            extra={"vertical_scores": count - 4, "spans": spans}))
    return out


def claim_of(results, seed=0):
    excess = positional_excess([r.receiver_profile for r in results],
                               [r.extra["spans"] for r in results], 10)
    return receiver_claim(excess["excess"], None, 500, seed), excess


def test_unique_spans_keep_the_first_of_each_sentence():
    texts = ["The", " answer", " is", " 7", ".", " the", "  answer", " is", " 7", ".",
             " So", " 7", ".", "The answer is 7."]
    spans = [(0, 5), (5, 10), (10, 13), (13, 14)]
    kept, dropped = unique_spans(texts, spans)
    assert kept == [(0, 5), (10, 13)] and dropped == 2         # case and spaces ignored
    assert unique_spans(texts, []) == ([], 0)


def test_a_repeated_sentence_counts_once(tiny_tokenizer):
    """8 distinct sentences, one repeated 12 times: 7 + 12 spans before (enough for the
    14 a receiver score needs), 8 distinct now: not scored."""
    from attnrl.analysis.collect import sentence_spans_of

    text = ("First add 3 and 4. That gives 7. " + "The answer is 7. " * 12
            + "Then check it. Seven minus four is three. So the sum holds. Done. Yes.")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    spans, dropped = sentence_spans_of(tiny_tokenizer, ids)
    assert spans is None and dropped == 11


def ref_profile(attention, spans, proximity_ignore=4):
    """u[h, s] by loops: mean over sentences i >= j(s) + proximity_ignore of the mean over
    the tokens t of i of A[h, t, s]."""
    H, N, _ = attention.shape
    out = np.full((H, N), math.nan)
    for j, (a, b) in enumerate(spans):
        later = [i for i in range(len(spans)) if i >= j + proximity_ignore]
        if not later:
            continue
        for h in range(H):
            for s in range(a, b):
                out[h, s] = np.mean([np.mean([attention[h, t, s] for t in range(*spans[i])])
                                     for i in later])
    return out


@pytest.mark.parametrize("proximity_ignore", [0, 2, 4])
def test_token_profile_matches_loops_and_gives_the_vertical_scores(proximity_ignore):
    rng = np.random.default_rng(proximity_ignore)
    N, H = 30, 3
    attention = torch.tensor(rng.random((H, N, N))).tril()
    attention = attention / attention.sum(-1, keepdim=True)
    spans = [(0, 3), (3, 4), (6, 10), (10, 15), (15, 16), (18, 24), (24, 30)]   # gaps at 4-6
    got = token_profile(sentence_rows(attention, spans), spans, proximity_ignore).numpy()
    ref = ref_profile(attention.numpy(), spans, proximity_ignore)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-12)
    vert = vertical_scores(sentence_matrix(attention, spans), proximity_ignore).numpy()
    means = span_means(got, spans)
    assert np.array_equal(np.isnan(means), np.isnan(vert))
    assert np.allclose(means[~np.isnan(vert)], vert[~np.isnan(vert)], atol=1e-12)


def ref_kurtosis(values):
    x = np.array([v for v in values if math.isfinite(v)])
    m2 = ((x - x.mean()) ** 2).mean()
    return ((x - x.mean()) ** 4).mean() / m2 ** 2 - 3


def test_positional_excess_matches_loops():
    rng = np.random.default_rng(3)
    profiles, spans = [], []
    for n in (22, 30, 26, 30, 18):
        edges = sorted(set([0, n] + rng.choice(np.arange(1, n), 9, replace=False).tolist()))
        spans.append(list(itertools.pairwise(edges)))
        p = rng.random((2, 3, n))
        p[..., -3:] = math.nan                                     # tail without scores
        profiles.append(p)
    got = positional_excess(profiles, spans, 4)
    for r in range(5):
        for l, h in itertools.product(range(2), range(3)):
            vert, vert0 = [], []
            for a, b in spans[r]:
                own = [profiles[r][l, h, s] for s in range(a, b)]
                rho = []
                for s in range(a, b):
                    others = [profiles[q][l, h, s] for q in range(5) if q != r
                              and s < profiles[q].shape[-1]
                              and math.isfinite(profiles[q][l, h, s])]
                    rho.append(np.mean(others) if others else math.nan)
                finite_own = [v for v in own if math.isfinite(v)]
                finite_rho = [v for v in rho if math.isfinite(v)]
                if finite_own and finite_rho:
                    vert.append(np.mean(finite_own))
                    vert0.append(np.mean(finite_rho))
            if len(vert) < 4:
                assert math.isnan(got["excess"][r, l, h])
                continue
            assert abs(got["kurtosis"][r, l, h] - ref_kurtosis(vert)) < 1e-9
            assert abs(got["positional"][r, l, h] - ref_kurtosis(vert0)) < 1e-9


def test_receiver_claim_matches_explicitly_resampled_data_sets():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(6), [1, 2, 1, 3, 1, 2])
    excess = rng.normal(size=(10, 2, 3)) + np.array([0.0, 3.0, 0.5])
    excess[4, 0, 1] = math.nan
    got = receiver_claim(excess, groups, draws=200, seed=7, margin=1.0, min_responses=5)
    flat = excess.reshape(10, 6)
    codes = group_codes(groups, 10)
    counts = bootstrap_counts(6, 200, np.random.default_rng(7))
    mean, se = [], []
    for h in range(6):
        x = flat[np.isfinite(flat[:, h]), h]
        mean.append(x.mean())
        se.append(x.std(ddof=1) / math.sqrt(x.size))
    devs = []
    for c in counts:                                      # the resampled data set, built
        rows = np.concatenate([np.flatnonzero(codes == g) for g in range(6)
                               for _ in range(c[g])])
        devs.append(max((np.nanmean(flat[rows, h]) - mean[h]) / se[h] for h in range(6)))
    q = np.quantile(devs, 0.95)
    lower = np.array(mean) - q * np.array(se)
    assert abs(got["quantile"] - q) < 1e-9
    assert np.allclose(got["lower"].reshape(-1), lower, atol=1e-9)
    assert got["heads"] == [tuple(int(i) for i in np.unravel_index(h, (2, 3)))
                            for h in np.argsort(-lower) if lower[h] > 1.0]
    few = receiver_claim(excess[:4], groups[:4], min_responses=5)
    assert not few["measurable"] and few["heads"] == []


def test_a_first_token_sink_without_receivers_is_no_receiver_claim():
    """270 heads of random causal attention with a +2 logit on the first token: every head
    reads as heavy-tailed (top mean kurtosis > 4, as the 5.3-5.9 read as receivers), its
    positional profile explains it (excess < 0), no head is claimed."""
    from attnrl.analysis.report_data import receiver_section
    from attnrl.analysis.summary import receiver_line

    results = simulated(0, sink=2.0)
    r = receiver_section(results, None, [], [])
    line = receiver_line(r)
    assert r["top_kurtosis"][0] > 4.0
    assert "no receiver claim" in line and r["claim"]["heads"] == [], line
    assert r["claim"]["best_lower"] < RECEIVER_MARGIN
    assert max(max(row) for row in r["excess_kurtosis"]) < 0.5


@pytest.mark.parametrize("sink", [0.0, 2.0])
def test_a_planted_receiver_is_claimed_and_random_heads_are_not(sink):
    """A sentence read back by every later sentence (head PLANTED, a different sentence in
    each response) is the only head claimed, with or without a sink (simulated lower
    bounds: planted 4-11, the others below 0.5 over 270 heads)."""
    claim, _ = claim_of(simulated(1, sink=sink, planted=True))
    assert claim["heads"] == [PLANTED], claim["heads"]
    assert claim["lower"][PLANTED] > RECEIVER_MARGIN + 1


def test_random_attention_is_no_claim_and_few_responses_are_not_measurable():
    claim, _ = claim_of(simulated(2, responses=8))
    assert claim["measurable"] and claim["heads"] == []
    assert np.nanmax(claim["lower"]) < RECEIVER_MARGIN
    few, _ = claim_of(simulated(3, responses=MIN_RECEIVER_RESPONSES - 1, planted=True))
    assert not few["measurable"] and few["heads"] == []
