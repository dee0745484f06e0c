"""QK-score credit (methods.md 2): head selection with an EMA of the per-head AUC finds a
planted head, and every formula of attnrl.signals.qk_select and the `qk_tokens` /
`qk_consistency` strategies matches a loop reference on seeded random inputs (atol 1e-6;
float64 references, float32 results)."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl.credit import CreditConfig, compute_gamma, required_inputs
from attnrl.errors import UserError
from attnrl.models import build_tiny_tokenizer
from attnrl.signals.qk_select import (
    Z_EPS,
    HeadSelector,
    answer_positions,
    consistency_factor,
    key_positions,
    premise_token_scores,
    response_scores,
    token_scores,
    validity,
)
from attnrl.signals.types import SignalConfig, TokenSignals

ATOL = 1e-6
SEEDS = range(5)


# ---- loop references ----------------------------------------------------------------------

def ref_auc(scores, labels):
    """P(score of a positive > score of a negative) + 1/2 P(tie), by counting pairs."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ref_top(values, k):
    """Indices of the k largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def ref_answer(ids, resp, eos):
    out = []
    for row_ids, row_resp in zip(ids.tolist(), resp.tolist()):
        content = [t for t, (tok, r) in enumerate(zip(row_ids, row_resp)) if r and tok not in eos]
        anywhere = [t for t, r in enumerate(row_resp) if r]
        out.append(content[-1] if content else (anywhere[-1] if anywhere else -1))
    return out


def ref_validity(r, selected):
    """v_i = mean over selected heads of (r_ih - mean_j r_jh) / (pop. std_j r_jh + eps)."""
    rows = [i for i in range(len(r)) if not any(math.isnan(x) for x in r[i])]
    v = [0.0] * len(r)
    for i in rows:
        total = 0.0
        for h in selected:
            col = [r[j][h] for j in rows]
            mean = sum(col) / len(col)
            std = math.sqrt(sum((c - mean) ** 2 for c in col) / len(col))
            total += (r[i][h] - mean) / (std + Z_EPS)
        v[i] = total / len(selected)
    return v


def ref_factor(v, a, damp):
    if a > 0:
        return 1 - damp * math.tanh(max(-v, 0.0))
    if a < 0:
        return 1 - damp * math.tanh(max(v, 0.0))
    return 1.0


def ref_top_q(values, eligible, q):
    """Per row, the ceil(q * n) largest eligible values (ties: earlier position)."""
    out = torch.zeros(values.shape, dtype=torch.bool)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if eligible[b, t]]
        count = math.ceil(len(idx) * q - 1e-9)
        for t in sorted(idx, key=lambda t: (-float(values[b, t]), t))[:count]:
            out[b, t] = True
    return out


# ---- inputs -------------------------------------------------------------------------------

def random_rows(seed, batch=5, length=16, eos=(2,)):
    """Left-padded prompts and right-padded responses; some responses end in EOS, one is
    only EOS, one row has no response."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (batch, length), generator=gen)
    attention = torch.zeros(batch, length, dtype=torch.bool)
    resp = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        start = pad + 2 + int(torch.randint(0, 4, (1,), generator=gen))
        size = int(torch.randint(1, length - start + 1, (1,), generator=gen))
        if b == batch - 1:
            size = 0                                        # no response
        attention[b, pad:start + size] = True
        resp[b, start:start + size] = True
        if size and b % 2 == 0:
            ids[b, start + size - 1] = eos[0]              # ends with EOS
        if b == 1 and size:
            ids[b, start:start + size] = eos[0]            # only EOS
    return ids, attention, resp


# ---- head selection -----------------------------------------------------------------------

def planted_batches(seed, n_batches=40, n=16, heads=16, planted=11, effect=0.8):
    """Scores (n, heads): N(0, 1) noise with per-head offsets and scales; the planted head
    adds `effect` on correct responses. Labels: half correct."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(heads, generator=gen) * 5
    scales = torch.rand(heads, generator=gen) * 2 + 0.5
    for _ in range(n_batches):
        labels = torch.randperm(n, generator=gen) < n // 2
        scores = torch.randn(n, heads, generator=gen) * scales + offsets
        scores[:, planted] += effect * scales[planted] * labels
        yield scores, labels


def test_ema_selection_finds_the_planted_head_where_single_batches_miss_it():
    planted, misses, batches = 11, 0, 0
    for seed in SEEDS:
        selector = HeadSelector([(0, h) for h in range(16)], top_k=1, every=1, decay=0.9)
        for step, (scores, labels) in enumerate(planted_batches(seed, planted=planted)):
            auc = selector.observe(scores, labels)
            selector.maybe_reselect(step)
            # the batch AUC is the pair-count AUC of every head
            for h in (0, planted):
                assert auc[h].item() == pytest.approx(ref_auc(scores[:, h].tolist(),
                                                              labels.tolist()), abs=1e-12)
            misses += int(auc.argmax()) != planted
            batches += 1
        assert selector.selected_heads == [(0, planted)], f"seed {seed}"
        assert selector.ema_auc[planted] > 0.6
    # one batch alone often ranks a noise head first: the EMA is what makes it reliable
    assert misses >= batches // 5, (misses, batches)


def test_ema_follows_its_definition_and_skips_one_label_batches():
    heads = [(1, h) for h in range(6)]
    selector = HeadSelector(heads, top_k=2, every=3, decay=0.7)
    gen = torch.Generator().manual_seed(0)
    ema = None
    for step in range(8):
        scores = torch.randn(10, 6, generator=gen)
        labels = torch.rand(10, generator=gen) < 0.5
        if step == 4:
            labels[:] = True                                  # one label only: skipped
        scores[2, 3] = float("nan")                           # a row without score: dropped
        keep = ~torch.isnan(scores).any(-1)
        auc = selector.observe(scores, labels)
        if labels[keep].all() or not labels[keep].any():
            assert auc is None
        else:
            batch = [ref_auc(scores[keep, h].tolist(), labels[keep].tolist()) for h in range(6)]
            ema = batch if ema is None else [0.7 * e + 0.3 * b for e, b in zip(ema, batch)]
        reselected = selector.maybe_reselect(step)
        assert reselected == (step % 3 == 0)
        if reselected:
            chosen = ref_top(ema, 2)
        assert selector.selected.tolist() == chosen
        torch.testing.assert_close(selector.ema_auc, torch.tensor(ema, dtype=torch.float64))
    # the state survives a JSON round trip (what a checkpoint stores)
    again = HeadSelector(heads, top_k=2, every=3, decay=0.7)
    again.load_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert again.selected_heads == selector.selected_heads
    assert again.selected_at == selector.selected_at and again.updates == selector.updates
    torch.testing.assert_close(again.ema_auc, selector.ema_auc)
    with pytest.raises(UserError, match="other candidate heads"):
        HeadSelector(heads[:5], top_k=2).load_state_dict(selector.state_dict())


def test_no_selection_before_both_labels():
    selector = HeadSelector([(0, 0), (0, 1)], top_k=1)
    assert selector.observe(torch.randn(4, 2), torch.ones(4, dtype=torch.bool)) is None
    assert not selector.maybe_reselect(0) and selector.selected is None
    assert selector.selected_heads == []


@pytest.mark.parametrize("kwargs,message", [
    ({"top_k": 0}, "qk_top_k must be in 1..3"), ({"top_k": 4}, "qk_top_k must be in 1..3"),
    ({"top_k": 1, "every": 0}, "qk_reselect_every must be >= 1"),
    ({"top_k": 1, "decay": 1.0}, r"qk_ema must be in \[0, 1\)"),
])
def test_selector_settings_are_checked(kwargs, message):
    with pytest.raises(UserError, match=message):
        HeadSelector([(0, 0), (0, 1), (1, 0)], **kwargs)


# ---- positions and scores -----------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_answer_and_key_positions_match_loops(seed):
    ids, attention, resp = random_rows(seed)
    answer = answer_positions(ids, resp, [2])
    assert answer.tolist() == ref_answer(ids, resp, {2})
    keys = key_positions(attention, answer)
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            want = s if attention[b, s] and s <= answer[b] else -1
            assert keys[b, s].item() == want


def test_answer_is_the_token_before_eos_with_a_real_tokenizer():
    tokenizer = build_tiny_tokenizer()
    text = tokenizer("the answer is 42", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[7, 8] + text + [tokenizer.eos_token_id],
                        [7, 8] + text + [9]])
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 2:] = True
    answer = answer_positions(ids, resp, [tokenizer.eos_token_id])
    assert answer.tolist() == [ids.shape[1] - 2, ids.shape[1] - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_response_and_token_scores_match_loops(seed):
    ids, attention, resp = random_rows(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    answer = answer_positions(ids, resp, [2])
    keys = key_positions(attention, answer)
    raw = torch.randn(ids.shape[0], 6, ids.shape[1], generator=gen) * 3
    scores = raw.masked_fill((keys < 0)[:, None, :], float("nan"))
    selected = torch.tensor([4, 1])
    mean, best = response_scores(scores, "mean"), response_scores(scores, "max")
    tokens = token_scores(scores, selected, resp, answer)
    for b in range(ids.shape[0]):
        where = [s for s in range(ids.shape[1]) if keys[b, s] >= 0]
        for h in range(6):
            if not where:
                assert math.isnan(mean[b, h]) and math.isnan(best[b, h])
                continue
            values = [float(raw[b, h, s]) for s in where]
            assert mean[b, h].item() == pytest.approx(sum(values) / len(values), abs=ATOL)
            assert best[b, h].item() == pytest.approx(max(values), abs=ATOL)
        for t in range(ids.shape[1]):
            if resp[b, t] and t <= answer[b]:
                want = (float(raw[b, 4, t]) + float(raw[b, 1, t])) / 2
                assert tokens[b, t].item() == pytest.approx(want, abs=ATOL)
            else:
                assert math.isnan(tokens[b, t])
    with pytest.raises(UserError, match="qk_reduce must be one of"):
        response_scores(scores, "median")


@pytest.mark.parametrize("seed", SEEDS)
def test_validity_and_factor_match_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(7, 5, generator=gen) * 4 + 10
    r[3] = float("nan")                                     # a row without response
    r[:, 2] = 1.5                                           # a constant head: z = 0
    selected = torch.tensor([0, 2, 4])
    v = validity(r, selected)
    want = ref_validity(r.tolist(), selected.tolist())
    torch.testing.assert_close(v, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=0)
    adv = torch.randn(7, generator=gen)
    adv[1] = 0.0
    for damp in (0.0, 0.3, 0.5, 1.0):
        factor = consistency_factor(v, adv, damp)
        expected = [ref_factor(float(vi), float(ai), damp) for vi, ai in zip(v, adv)]
        torch.testing.assert_close(factor, torch.tensor(expected), atol=ATOL, rtol=0)
    assert validity(r[:1], selected).tolist() == [0.0]      # one response: no contrast


@settings(max_examples=60, deadline=None)
@given(v=st.lists(st.floats(-50, 50), min_size=1, max_size=12),
       signs=st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=12, max_size=12),
       damp=st.floats(0, 1))
def test_factor_is_bounded_and_damps_only_the_disagreeing_side(v, signs, damp):
    v = torch.tensor(v)
    adv = torch.tensor(signs[:len(v)])
    factor = consistency_factor(v, adv, damp)
    assert ((factor >= 1 - damp - 1e-6) & (factor <= 1 + 1e-6)).all()
    agree = ((adv > 0) & (v >= 0)) | ((adv < 0) & (v <= 0)) | (adv == 0)
    assert (factor[agree] == 1).all()


# ---- the strategies through compute_gamma -------------------------------------------------

def qk_case(seed, batch=6, length=20):
    ids, attention, resp = random_rows(seed, batch, length)
    gen = torch.Generator().manual_seed(50 + seed)
    answer = answer_positions(ids, resp, [2])
    raw = torch.randn(batch, 5, length, generator=gen)
    tokens = token_scores(raw, torch.tensor([0, 3]), resp, answer)
    v = torch.randn(batch, generator=gen)
    adv = torch.randn(batch, generator=gen)
    return resp, tokens, v, adv


def config(strategy, **kwargs):
    return CreditConfig(strategy=strategy, gamma_amp=1.5, signals=SignalConfig(q=0.4), **kwargs)


@pytest.mark.parametrize("seed", SEEDS)
def test_qk_tokens_is_the_anchor_rule_on_token_scores(seed):
    resp, tokens, v, adv = qk_case(seed)
    gamma = compute_gamma(config("qk_tokens"), None, resp, qk_token_scores=tokens)
    marked = ref_top_q(tokens, resp & ~torch.isnan(tokens), 0.4)
    expected = torch.where(marked, 1.5, 1.0)
    torch.testing.assert_close(gamma, expected, atol=ATOL, rtol=0)
    assert marked.any()
    # no selection yet (all NaN): no bonus anywhere
    none = compute_gamma(config("qk_tokens"), None, resp,
                         qk_token_scores=torch.full(resp.shape, float("nan")))
    assert (none == 1).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_qk_premise_marks_the_tokens_most_aligned_with_the_prompt(seed):
    """gamma of qk_premise from raw per-head alignments (B, H, N) and a head selection,
    against loops: p_t = mean over selected heads, top ceil(q n) response tokens x gamma_amp."""
    ids, attention, resp = random_rows(seed, 6, 20)
    gen = torch.Generator().manual_seed(70 + seed)
    raw = torch.randn(6, 5, 20, generator=gen)
    selected = [1, 4]
    scores = premise_token_scores(raw, torch.tensor(selected), resp)
    gamma = compute_gamma(config("qk_premise"), None, resp, qk_premise_scores=scores)
    expected = torch.ones(6, 20)
    for b in range(6):
        tokens = [t for t in range(20) if resp[b, t]]
        p = {t: sum(float(raw[b, h, t]) for h in selected) / len(selected) for t in tokens}
        count = math.ceil(len(tokens) * 0.4 - 1e-9)
        for t in sorted(tokens, key=lambda t: (-p[t], t))[:count]:
            expected[b, t] = 1.5
        for t in range(20):
            assert math.isnan(float(scores[b, t])) == (not resp[b, t])
    torch.testing.assert_close(gamma, expected, atol=ATOL, rtol=0)
    assert (expected > 1).any()
    assert required_inputs("qk_premise") == {"qk_premise_scores"}
    none = compute_gamma(config("qk_premise"), None, resp,
                         qk_premise_scores=torch.full(resp.shape, float("nan")))
    assert (none == 1).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_qk_consistency_scales_each_response_and_composes(seed):
    resp, tokens, v, adv = qk_case(seed)
    cfg = config("qk_consistency", qk_damp=0.4)
    gamma = compute_gamma(cfg, None, resp, qk_validity=v, advantages=adv)
    factor = torch.tensor([ref_factor(float(a), float(b), 0.4) for a, b in zip(v, adv)])
    expected = torch.where(resp, factor[:, None].expand_as(resp), torch.ones(resp.shape))
    torch.testing.assert_close(gamma, expected, atol=ATOL, rtol=0)
    # '+': token bonus times the response factor, clipped to gamma_amp
    both = compute_gamma(config("qk_tokens+qk_consistency", qk_damp=0.4), None, resp,
                         qk_token_scores=tokens, qk_validity=v, advantages=adv)
    marked = ref_top_q(tokens, resp & ~torch.isnan(tokens), 0.4)
    want = torch.where(marked, 1.5, 1.0) * factor[:, None]
    want = torch.where(resp, want.clamp(0, 1.5), torch.ones(resp.shape))
    torch.testing.assert_close(both, want, atol=ATOL, rtol=0)


def test_coupled_plus_qk_consistency_multiplies_the_coupled_gamma():
    resp, tokens, v, adv = qk_case(3)
    anchors = resp & (torch.arange(resp.shape[1]) % 3 == 0)
    zeros = torch.zeros(resp.shape)
    none = torch.zeros(resp.shape, dtype=torch.bool)
    signals = TokenSignals(waad=zeros, fai=zeros, delta=zeros, fai_valid=resp,
                           preplan_mask=none, anchor_mask=anchors, dominated_mask=none,
                           intro_mask=none, head_span=torch.zeros(resp.shape[0], 1, 2),
                           local_heads=torch.zeros(1, 2, dtype=torch.bool),
                           global_heads=torch.zeros(1, 2, dtype=torch.bool), layers=[0])
    coupled = compute_gamma(config("coupled"), signals, resp)
    both = compute_gamma(config("coupled+qk_consistency"), signals, resp, qk_validity=v,
                         advantages=adv)
    factor = consistency_factor(v, adv, 0.5)
    torch.testing.assert_close(both, torch.where(resp, coupled * factor[:, None], coupled))
    assert required_inputs("coupled+qk_consistency") == {"signals", "qk_validity", "advantages"}
    assert (factor < 1).any() and anchors.any()


def test_missing_or_misshaped_qk_inputs_are_user_errors():
    resp, tokens, v, adv = qk_case(0)
    with pytest.raises(UserError, match="qk_tokens.*needs the answer query's QK alignment"):
        compute_gamma(config("qk_tokens"), None, resp)
    with pytest.raises(UserError, match="needs the outcome advantages"):
        compute_gamma(config("qk_consistency"), None, resp, qk_validity=v)
    with pytest.raises(UserError, match=r"qk_validity must be \(B,\)"):
        compute_gamma(config("qk_consistency"), None, resp, qk_validity=v[:3], advantages=adv)
    with pytest.raises(UserError, match="qk_token_scores has shape"):
        compute_gamma(config("qk_tokens"), None, resp, qk_token_scores=tokens[:, :5])
    with pytest.raises(UserError, match=r"qk_damp must be in \[0, 1\]"):
        config("qk_consistency", qk_damp=1.5)
