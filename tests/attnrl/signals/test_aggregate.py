"""Vectorised aggregation (attnrl.signals.aggregate, types.top_q_mask) against the plain
loops of attnrl.signals.reference, on random inputs (hypothesis). Exact equality for sets;
1e-6 for numbers computed two ways in float32."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnrl.errors import UserError
from attnrl.signals import SignalConfig, top_q_mask
from attnrl.signals import reference as ref
from attnrl.signals.aggregate import (
    delta_from_waad,
    fai_counts,
    masked_lower_median,
    select_heads,
    token_sets,
    token_signals_from_head_stats,
)
from attnrl.signals.types import HeadStats

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def rows(draw, max_n=40, ties=True):
    """values (B, N) float (with ties when drawn from a small set) and a (B, N) bool mask."""
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    pool = st.integers(0, 4).map(float) if ties and draw(st.booleans()) else \
        st.floats(-5, 5, allow_nan=False, width=32)
    values = torch.tensor([[draw(pool) for _ in range(n)] for _ in range(B)])
    valid = torch.tensor([[draw(st.booleans()) for _ in range(n)] for _ in range(B)])
    return values, valid


@SETTINGS
@given(rows(), st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.4, 0.5, 0.6, 1.0]))
def test_top_q_mask_equals_loop(data, q):
    values, valid = data
    assert torch.equal(top_q_mask(values, valid, q), ref.top_q(values, valid, q))


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 10), st.sampled_from([0.1, 0.3, 0.45, 0.5]),
       st.integers(0, 1000), st.booleans())
def test_select_heads_equals_loop(L, H, quantile, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    span = torch.randint(0, 3, (L, H), generator=gen).float() if ties else \
        torch.rand(L, H, generator=gen) * 50
    local, global_ = select_heads(span, quantile)
    want_local, want_global = ref.split_heads(span, quantile)
    assert torch.equal(local, want_local) and torch.equal(global_, want_global)
    n = L * H
    count = max(1, math.ceil(quantile * n - 1e-9))
    assert local.sum() == global_.sum() == (min(count, n // 2) if n >= 2 else 1)
    if n >= 2:  # local and global never share a head, with ties or an odd head count
        assert not (local & global_).any()
        assert span[local].max() <= span[global_].min()


def test_select_heads_disjoint_where_the_old_rule_overlapped():
    # 9 heads at 0.5 (ceil 4.5 = 5 each) and equal spans (both took the lowest indices)
    odd = torch.arange(9.0).view(3, 3)
    local, global_ = select_heads(odd, 0.5)
    assert local.view(-1).tolist() == [True] * 4 + [False] * 5
    assert global_.view(-1).tolist() == [False] * 5 + [True] * 4
    local, global_ = select_heads(torch.ones(2, 4), 0.3)  # ceil(2.4) = 3 each
    assert local.view(-1).tolist() == [True] * 3 + [False] * 5
    assert global_.view(-1).tolist() == [False] * 5 + [True] * 3
    one_head = select_heads(torch.ones(1, 1), 0.3)
    assert one_head[0].item() and one_head[1].item()
    with pytest.raises(UserError, match=r"head_quantile must be in \(0, 0.5\]"):
        select_heads(odd, 0.6)


@SETTINGS
@given(rows(max_n=60), st.integers(0, 15), st.one_of(st.none(), st.integers(0, 30)))
def test_fai_counts_equal_loop(data, h_lo, extra):
    _, response = data
    h_hi = None if extra is None else h_lo + extra
    B, n = response.shape
    want = torch.zeros(B, n)
    for b in range(B):
        for s in range(n):
            last = n - 1 if h_hi is None else min(n - 1, s + h_hi)
            want[b, s] = sum(1 for t in range(s + h_lo, last + 1) if response[b, t])
    assert torch.equal(fai_counts(response, h_lo, h_hi), want)


@SETTINGS
@given(rows(ties=False))
def test_delta_and_median_equal_loop(data):
    values, response = data
    values = values.abs()
    assert torch.allclose(delta_from_waad(values * response, response),
                          ref.delta(values * response, response), atol=1e-6, rtol=0)
    for b in range(values.shape[0]):
        want = ref.lower_median([float(v) for v, r in zip(values[b], response[b]) if r])
        assert float(masked_lower_median(values, response)[b]) == want


@st.composite
def set_cases(draw):
    waad, response = draw(rows(max_n=50))
    waad = waad.abs() * response
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    fai = torch.rand(waad.shape, generator=gen)
    if draw(st.booleans()):
        fai = (fai * 3).round()                                          # ties
    fai_valid = response & (torch.rand(waad.shape, generator=gen) < 0.9)
    fai = fai * fai_valid
    config = SignalConfig(
        q=draw(st.sampled_from([0.1, 0.4, 0.7, 1.0])), k=draw(st.integers(0, 4)),
        preplan_by=draw(st.sampled_from(["delta", "waad"])),
        tau_waad=draw(st.one_of(st.none(), st.floats(0, 5, width=32))),
        tau_delta=draw(st.one_of(st.none(), st.floats(0, 3, width=32))))
    return waad, fai, fai_valid, response, config


@SETTINGS
@given(set_cases())
def test_token_sets_equal_loops(case):
    waad, fai, fai_valid, response, config = case
    delta, preplan, anchor, dominated, intro = token_sets(waad, fai, fai_valid, response,
                                                          config)
    want_delta = ref.delta(waad, response)
    assert torch.equal(delta, want_delta)  # |a - b| of float32 values is correctly rounded
    rank = want_delta if config.preplan_by == "delta" else waad
    assert torch.equal(preplan, ref.top_q(rank, response, config.q))
    want_anchor = ref.top_q(fai, fai_valid, config.q)
    assert torch.equal(anchor, want_anchor)
    want_dom, want_intro = ref.dominated_and_intro(want_anchor, waad, want_delta,
                                                   response, config.k, config.tau_waad,
                                                   config.tau_delta)
    assert torch.equal(dominated, want_dom)
    assert torch.equal(intro, want_intro)
    assert not (dominated & ~anchor).any() and not (intro & ~response).any()


def random_maps(B, L, H, n, keep, gen):
    """Random causal attention maps (B, L, H, N, N) over the kept keys, rows sum to 1."""
    logits = torch.randn(B, L, H, n, n, generator=gen, dtype=torch.float64) * 2
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & keep[:, None, None, None, :]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 5), st.integers(2, 40),
       st.integers(0, 10_000), st.booleans())
def test_head_stats_to_signals_equal_reference_maps(B, L, H, n, seed, given_split):
    """The fast path's aggregation (per-head stats, then head means) equals the literal
    pipeline on the same maps (head means of the maps, then the definitions)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, n, generator=gen) < 0.9
    keep[:, -1] = True
    response = keep & (torch.rand(B, n, generator=gen) < 0.7)
    response[0, -1] = True
    maps = random_maps(B, L, H, n, keep, gen)
    config = SignalConfig(window=4, h_lo=2, h_hi=int(torch.randint(2, 12, (1,),
                                                                    generator=gen)))
    waad = torch.zeros(B, L, H, n)
    span = torch.zeros(B, L, H, n)
    fai_sum = torch.zeros(B, L, H, n)
    for l in range(L):
        flat = maps[:, l].reshape(B * H, n, n)
        waad[:, l] = ref.waad(flat, config.window).view(B, H, n).float()
        span[:, l] = ref.span_per_query(maps[:, l]).float()
        for b in range(B):
            for s in range(n):
                ts = [t for t in range(s + config.h_lo, min(n - 1, s + config.h_hi) + 1)
                      if response[b, t]]
                if ts:
                    fai_sum[b, l, :, s] = maps[b, l, :, ts, s].sum(-1).float()
    split = None
    if given_split:
        split = (torch.rand(L, H, generator=gen) < 0.5, torch.rand(L, H, generator=gen) < 0.5)
        split[0][0, 0] = split[1][-1, -1] = True
    stats = HeadStats(waad=waad, fai_sum=fai_sum, span=span, layers=list(range(L)))
    got = token_signals_from_head_stats(stats, response, config, head_split=split)
    want = ref.reference_signals_from_maps(maps, response, config, list(range(L)), split)
    torch.testing.assert_close(got.head_span, want.head_span.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.local_heads, want.local_heads)
    assert torch.equal(got.global_heads, want.global_heads)
    torch.testing.assert_close(got.waad, want.waad.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.fai, want.fai.float(), atol=1e-6, rtol=0)
    assert torch.equal(got.fai_valid, want.fai_valid)
    # sets agree when computed from the same numbers
    sets = token_sets(want.waad.float(), want.fai.float(), want.fai_valid, response, config)
    for mine, theirs in zip(sets[1:], (want.preplan_mask, want.anchor_mask,
                                       want.dominated_mask, want.intro_mask)):
        assert torch.equal(mine, theirs)
