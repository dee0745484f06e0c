"""The reference (oracle) itself: its eager maps are the model's attention, and its
definitions give the values they must on maps whose answer is known by construction."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnrl.models import build_tiny_model
from attnrl.signals import SignalConfig
from attnrl.signals import reference as ref

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_attention_maps_are_the_models_causal_softmax():
    """Rows of real tokens sum to 1 and give 0 to padding and future keys; the attention
    implementation is restored afterwards."""
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=3)
    ids = torch.randint(4, 500, (2, 20))
    attention = torch.ones(2, 20, dtype=torch.long)
    attention[0, :6] = 0                                                  # left padding
    attention[1, 15:] = 0                                                 # right padding
    maps = ref.attention_maps(model, ids, attention, [0, 2])
    assert model.config._attn_implementation == "sdpa"
    assert sorted(maps) == [0, 2]
    for a in maps.values():
        real = attention.bool()
        sums = a.sum(-1)                                                  # (B, H, N)
        torch.testing.assert_close(sums[real[:, None, :].expand_as(sums)],
                                   torch.ones(int(real.sum()) * 4), atol=1e-5, rtol=0)
        future = torch.ones(20, 20, dtype=torch.bool).triu(1)
        for b in range(2):
            assert (a[b][:, real[b]][..., future[real[b]]] == 0).all()
        rows = real[:, None, :, None] & ~real[:, None, None, :]
        assert (a.masked_select(rows.expand_as(a)) == 0).all()


@st.composite
def one_hot_maps(draw):
    """Maps where row t attends only to s = t - j_t: WAAD, span and FAI are known."""
    B = draw(st.integers(1, 2))
    n = draw(st.integers(1, 30))
    jumps = [[draw(st.integers(0, t)) for t in range(n)] for _ in range(B)]
    a = torch.zeros(B, n, n)
    for b in range(B):
        for t in range(n):
            a[b, t, t - jumps[b][t]] = 1.0
    response = torch.tensor([[draw(st.booleans()) for _ in range(n)] for _ in range(B)])
    return a, jumps, response


@SETTINGS
@given(one_hot_maps(), st.integers(1, 12), st.integers(0, 6),
       st.one_of(st.none(), st.integers(0, 12)))
def test_definitions_on_one_hot_maps(case, window, h_lo, extra):
    a, jumps, response = case
    B, n = response.shape
    h_hi = None if extra is None else h_lo + extra
    waad = ref.waad(a, window)
    span = ref.span_per_query(a[:, None])[:, 0]
    fai, valid = ref.fai(a, response, h_lo, h_hi)
    for b in range(B):
        for t in range(n):
            assert waad[b, t] == min(jumps[b][t], window)
            assert span[b, t] == jumps[b][t]
        for s in range(n):
            last = n - 1 if h_hi is None else min(n - 1, s + h_hi)
            ts = [t for t in range(s + h_lo, last + 1) if response[b, t]]
            hits = sum(1 for t in ts if t - jumps[b][t] == s)
            assert bool(valid[b, s]) == (bool(response[b, s]) and bool(ts))
            expect = hits / len(ts) if valid[b, s] else 0.0
            assert math.isclose(float(fai[b, s]), expect, rel_tol=1e-6)


def test_uniform_attention_span_and_waad():
    """Uniform causal attention: span_t = t / 2 and WAAD_t = mean of min(d, W), d = 0..t."""
    n, window = 25, 10
    a = torch.ones(n, n).tril()
    a = (a / a.sum(-1, keepdim=True))[None]
    response = torch.zeros(1, n, dtype=torch.bool)
    response[0, 5:] = True
    waad = ref.waad(a, window)[0]
    for t in range(n):
        assert math.isclose(float(waad[t]), sum(min(d, window) for d in range(t + 1)) / (t + 1),
                            rel_tol=1e-6)
    span = ref.head_span(a[:, None], response)[0, 0]
    assert math.isclose(float(span), sum(t / 2 for t in range(5, n)) / (n - 5), rel_tol=1e-6)


def test_reference_token_signals_shapes_and_zeros_outside_response():
    model = build_tiny_model("qwen2", num_heads=4, num_kv_heads=2, num_layers=6)
    ids = torch.randint(4, 500, (2, 40))
    attention = torch.ones(2, 40, dtype=torch.long)
    attention[1, :8] = 0
    response = torch.zeros(2, 40, dtype=torch.bool)
    response[0, 15:] = True
    response[1, 20:35] = True
    config = SignalConfig(h_lo=2, h_hi=8)
    signals = ref.reference_token_signals(model, ids, attention, response, config)
    assert signals.layers == [2, 3, 4]
    assert signals.head_span.shape == (2, 3, 4)
    n_heads = math.ceil(0.3 * 12)
    assert signals.local_heads.sum() == n_heads == signals.global_heads.sum()
    for name in ("waad", "fai", "delta"):
        assert (getattr(signals, name)[~response] == 0).all()
    for name in ("fai_valid", "preplan_mask", "anchor_mask", "dominated_mask", "intro_mask"):
        assert not (getattr(signals, name) & ~response).any()
    # the last h_lo response tokens have no future query in range: never anchors
    assert not signals.fai_valid[0, 38:].any() and signals.fai_valid[0, 15:38].all()
    assert signals.preplan_mask[0].sum() == math.ceil(0.4 * 25)
