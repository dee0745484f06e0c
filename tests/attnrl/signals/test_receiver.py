"""Receiver heads: sentence split, block means, vertical scores, kurtosis, head choice."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl.errors import UserError
from attnrl.models import build_tiny_model
from attnrl.signals.receiver import (
    MIN_SENTENCE_SCORES,
    find_receiver_heads,
    head_kurtosis,
    kurtosis,
    min_sentences,
    receiver_kurtosis,
    select_receiver_heads,
    sentence_matrix,
    sentence_spans,
    vertical_scores,
)


def _random_causal_attention(gen, heads, n):
    logits = torch.randn(heads, n, n, generator=gen, dtype=torch.float64)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _random_spans(gen, n_sentences, max_len=5):
    lengths = torch.randint(1, max_len + 1, (n_sentences,), generator=gen).tolist()
    edges = np.cumsum([0] + lengths).tolist()
    return list(itertools.pairwise(edges)), edges[-1]


def _numpy_kurtosis(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    d = x - x.mean()
    return (d ** 4).mean() / (d ** 2).mean() ** 2 - 3.0


def test_sentence_spans_rule():
    texts = ["First", " step", ":", " 3", ".", "5", " plus", " 1", ".", "\n", "\n", "Then",
             " what", "?", " Done", "!", " tail"]
    spans = sentence_spans(texts)
    # decimal point kept inside; blank-line tokens join the sentence before; tail kept
    assert spans == [(0, 11), (11, 14), (14, 16), (16, 17)]
    assert sentence_spans(["no", " end"]) == [(0, 2)]
    covered = [i for a, b in spans for i in range(a, b)]
    assert covered == list(range(len(texts)))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_matrix_and_vertical_scores_equal_loops(n_sentences, ignore, seed):
    gen = torch.Generator().manual_seed(seed)
    spans, n = _random_spans(gen, n_sentences)
    attn = _random_causal_attention(gen, 2, n)
    matrix = sentence_matrix(attn, spans)
    vert = vertical_scores(matrix, ignore)
    for h in range(2):
        for i, (a, b) in enumerate(spans):
            for j, (c, d) in enumerate(spans):
                block = [attn[h, r, s].item() for r in range(a, b) for s in range(c, d)]
                assert abs(matrix[h, i, j].item() - sum(block) / len(block)) < 1e-12
        for j in range(n_sentences):
            rows = [matrix[h, i, j].item() for i in range(n_sentences) if i >= j + ignore]
            if rows:
                assert abs(vert[h, j].item() - sum(rows) / len(rows)) < 1e-12
            else:
                assert np.isnan(vert[h, j].item())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**31 - 1), st.floats(0.0, 0.5))
def test_kurtosis_equals_numpy_formula(n, seed, nan_fraction):
    rng = np.random.default_rng(seed)
    x = rng.standard_exponential(n) ** 2
    x[rng.random(n) < nan_fraction] = np.nan
    got = kurtosis(torch.tensor(x)).item()
    finite = x[np.isfinite(x)]
    if finite.size < 2 or finite.std() == 0:
        assert np.isnan(got)
    else:
        assert abs(got - _numpy_kurtosis(x)) < 1e-9 * max(1.0, abs(got))


def test_planted_receiver_head_is_selected():
    """One head per response sends every later sentence's attention to one early sentence."""
    gen = torch.Generator().manual_seed(0)
    layers, heads, planted = 3, 4, (1, 2)
    per_response = []
    for _ in range(4):
        spans, n = _random_spans(gen, 14)
        attn = _random_causal_attention(gen, layers * heads, n).reshape(layers, heads, n, n)
        target = int(torch.randint(0, 6, (1,), generator=gen))
        a, b = spans[target]
        spiky = attn[planted].clone()
        spiky[spans[target + 4][0]:, a:b] += 5.0          # later sentences look back at it
        attn[planted] = spiky / spiky.sum(-1, keepdim=True)
        per_response.append(head_kurtosis(attn, spans))
    chosen = select_receiver_heads(per_response, top_k=1, layers=[4, 5, 6])
    assert chosen == [(4 + planted[0], planted[1])]
    mean = torch.stack(per_response).nanmean(0)
    assert mean[planted] > mean.flatten().sort().values[-2] + 1.0
    top3 = select_receiver_heads(per_response, top_k=3)
    assert top3[0] == planted and len(set(top3)) == 3


def test_model_hook_path_equals_output_attentions(tiny_tokenizer):
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=3)
    prompt = tiny_tokenizer("Question: What is 3 + 4?")["input_ids"]
    response = tiny_tokenizer("First 3. Then 4. So 7. Check 7. Yes 7. The answer is 7. "
                              "Done.")["input_ids"]
    texts = [tiny_tokenizer.decode([t]) for t in response]
    spans = [(a + len(prompt), b + len(prompt)) for a, b in sentence_spans(texts)]
    assert len(spans) == 7
    ids = torch.tensor(prompt + response)
    got = receiver_kurtosis(model, ids, spans, layers=[0, 2])
    assert model.config._attn_implementation == "sdpa"
    eager = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=3,
                             attn_implementation="eager")
    with torch.no_grad():
        attn = eager(input_ids=ids[None], output_attentions=True).attentions
    for row, layer in enumerate([0, 2]):
        vert = vertical_scores(sentence_matrix(attn[layer][0].double(), spans), 4)
        expect = torch.tensor([_numpy_kurtosis(v.numpy()) for v in vert], dtype=torch.float32)
        torch.testing.assert_close(got[row], expect, rtol=1e-4, atol=1e-4)
    heads, mean = find_receiver_heads(model, tiny_tokenizer, [(prompt, response)], top_k=5,
                                      min_scores=3)
    assert mean.shape == (3, 4) and len(heads) == 5
    torch.testing.assert_close(mean[[0, 2]], got)
    # by default a response needs MIN_SENTENCE_SCORES vertical scores (14 sentences)
    with pytest.raises(UserError, match="14 sentences"):
        find_receiver_heads(model, tiny_tokenizer, [(prompt, response)])
    with pytest.raises(UserError, match="sentences"):
        find_receiver_heads(model, tiny_tokenizer, [(prompt, response[:6])], min_scores=3)


def test_min_sentences_constant():
    assert MIN_SENTENCE_SCORES == 10 and min_sentences() == 14 and min_sentences(2, 5) == 7


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_kurtosis_of_n_values_is_bounded_by_n(n, seed):
    """Why few sentences cannot show a heavy tail: the excess kurtosis of n values is at
    most n - 5 + 1 / (n - 1) (reached by one outlier), -2 for n = 2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_cauchy(n)
    bound = n - 5 + 1 / (n - 1)
    assert kurtosis(torch.tensor(x)).item() <= bound + 1e-9
    spike = torch.zeros(n, dtype=torch.float64)
    spike[0] = 1.0
    assert abs(kurtosis(spike).item() - bound) < 1e-9
