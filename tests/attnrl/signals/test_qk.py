"""QK-scores against plain recomputations, and AUC head selection against pair counts."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl.errors import UserError
from attnrl.models import build_tiny_model
from attnrl.signals.qk import (
    QKCapture,
    all_heads,
    auc_per_head,
    mask_to_positions,
    premise_alignment,
    qk_scores,
    select_heads_by_auc,
)

ARCHS = [("llama", 4, 4), ("llama", 4, 2), ("qwen2", 4, 1), ("qwen2", 6, 2)]
RTOL, ATOL = 1e-4, 1e-4


def _batch(seed: int, batch: int = 3, length: int = 14, vocab: int = 500):
    """Random ids with left padding of 0, 3 and 5 tokens (rows beyond the first)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 5][:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 3
    return ids, mask


def _rotate(x, cos, sin):
    """Rotary embedding: x * cos + rotate_half(x) * sin; x (B, H, N, d), cos/sin (B, N, d)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


def _manual_qk(model, ids, mask):
    """q, k of every layer recomputed from the layer input with the projection weights and
    the rotary formula x * cos + rotate_half(x) * sin. Returns {layer: (q (B,H,N,d),
    k (B,H_kv,N,d))}."""
    inputs = {}

    def grab(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs
                                    else args[0], kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
               for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    out = {}
    for layer_idx, (hidden, (cos, sin)) in inputs.items():
        attn = model.model.layers[layer_idx].self_attn
        b, n, _ = hidden.shape
        d = attn.head_dim
        q = attn.q_proj(hidden).view(b, n, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden).view(b, n, -1, d).transpose(1, 2)

        out[layer_idx] = (_rotate(q, cos, sin), _rotate(k, cos, sin))
    return out


@pytest.mark.parametrize("arch,heads,kv_heads", ARCHS)
def test_scores_equal_manual_projection(arch, heads, kv_heads):
    model = build_tiny_model(arch, num_heads=heads, num_kv_heads=kv_heads, num_layers=3)
    ids, mask = _batch(1)
    gen = torch.Generator().manual_seed(2)
    qpos = torch.randint(5, ids.shape[1], (3, 4), generator=gen)
    kpos = torch.randint(5, ids.shape[1], (3, 6), generator=gen)
    chosen = [(0, 0), (2, heads - 1), (1, 1), (2, 0)]
    scores = qk_scores(model, ids, mask, qpos, kpos, heads=chosen)
    assert scores.shape == (3, len(chosen), 4, 6)
    manual = _manual_qk(model, ids, mask)
    group = heads // kv_heads
    for slot, (layer, head) in enumerate(chosen):
        q, k = manual[layer]
        for b in range(3):
            expect = q[b, head, qpos[b]] @ k[b, head // group, kpos[b]].T
            torch.testing.assert_close(scores[b, slot], expect, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch,heads,kv_heads", ARCHS)
def test_score_differences_equal_eager_log_attention(arch, heads, kv_heads):
    """softmax(S * scaling + mask): log A_as - log A_as' = scaling (S_as - S_as')."""
    model = build_tiny_model(arch, num_heads=heads, num_kv_heads=kv_heads, num_layers=3,
                             attn_implementation="eager")
    ids, mask = _batch(3)
    n = ids.shape[1]
    with torch.no_grad():
        attn = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    layers = [0, 2]
    scores = qk_scores(model, ids, mask, torch.arange(n), torch.arange(n), layers=layers)
    assert model.config._attn_implementation == "eager"  # restored after the capture
    scaling = model.model.layers[0].self_attn.scaling
    for slot, (layer, head) in enumerate(all_heads(model, layers)):
        for b in range(ids.shape[0]):
            first = int((mask[b] == 0).sum())          # first real token: the reference key
            for a in range(first + 1, n):
                log_a = attn[layer][b, head, a, first:a + 1].double().log()
                from_attention = (log_a - log_a[0]) / scaling
                s = scores[b, slot, a, first:a + 1].double()
                torch.testing.assert_close(s - s[0], from_attention, rtol=1e-3, atol=2e-3)


def test_left_padding_does_not_change_scores():
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=2)
    ids, mask = _batch(5)
    heads = all_heads(model)
    batched = qk_scores(model, ids, mask, torch.arange(ids.shape[1]),
                        torch.arange(ids.shape[1]), heads=heads)
    for b, pad in enumerate([0, 3, 5]):
        alone = qk_scores(model, ids[b:b + 1, pad:], None, torch.arange(ids.shape[1] - pad),
                          torch.arange(ids.shape[1] - pad), heads=heads)
        torch.testing.assert_close(batched[b, :, pad:, pad:], alone[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_capture_keeps_model_outputs_and_restores_implementation(arch):
    model = build_tiny_model(arch, num_heads=4, num_kv_heads=2, num_layers=2)
    ids, mask = _batch(7)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with QKCapture(model, [(1, 3)], torch.tensor([13]), torch.arange(14)) as cap:
            captured = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(captured[real], plain[real], rtol=0, atol=1e-6)
    assert cap.scores.shape == (3, 1, 1, 14)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_attnrl_qk_sink") for m in model.modules())


def test_minus_one_positions_give_nan_and_premise_alignment_matches_full_scores():
    model = build_tiny_model("qwen2", num_heads=4, num_kv_heads=2, num_layers=2)
    ids, mask = _batch(9)
    prompt_len = [7, 9, 10]
    n = ids.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    prompt = (pos < torch.tensor(prompt_len)[:, None]) & mask.bool()
    response = (pos >= torch.tensor(prompt_len)[:, None])
    heads = [(0, 1), (1, 3)]
    full = qk_scores(model, ids, mask, torch.arange(n), torch.arange(n), heads=heads)
    for reduce in ("mean", "max"):
        got = premise_alignment(model, ids, mask, prompt, response, heads, reduce=reduce)
        for b in range(3):
            block = full[b][:, :, prompt[b]]                      # (h, N, P)
            expect = block.mean(-1) if reduce == "mean" else block.amax(-1)
            expect = torch.where(response[b], expect, torch.zeros_like(expect))
            torch.testing.assert_close(got[b], expect, rtol=RTOL, atol=ATOL)
    positions = mask_to_positions(prompt)
    assert positions.shape == (3, max(int(r.sum()) for r in prompt))
    partial = qk_scores(model, ids, mask, torch.tensor([n - 1]), positions, heads=heads)
    assert not torch.isnan(partial[0]).any()                  # the longest prompt (7 tokens)
    assert torch.isnan(partial[2, :, :, int(prompt[2].sum()):]).all()
    assert not torch.isnan(partial[2, :, :, :int(prompt[2].sum())]).any()


def test_padding_gives_nan_and_bad_inputs_raise_user_errors():
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=2)
    ids, mask = _batch(11)
    on_pad = qk_scores(model, ids, mask, torch.tensor([13]), torch.tensor([0]), heads=[(0, 0)])
    assert not torch.isnan(on_pad[0]).any() and torch.isnan(on_pad[1:]).all()
    with pytest.raises(UserError, match="out of range"):
        qk_scores(model, ids, mask, torch.tensor([13]), torch.tensor([12]), heads=[(2, 0)])
    with pytest.raises(UserError, match="must lie in"):
        qk_scores(model, ids, mask, torch.tensor([14]), torch.tensor([12]), heads=[(0, 0)])
    with pytest.raises(UserError, match="out of range"):
        all_heads(model, [5])


# ------------------------------------------------------------------------------- AUC

def _auc_by_pairs(column, labels):
    pos = [x for x, y in zip(column, labels) if y]
    neg = [x for x, y in zip(column, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_auc_equals_pairwise_count(n, n_heads, seed, coarse):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=gen) < 0.5
    labels[0], labels[1] = True, False
    scores = (torch.randint(0, 3, (n, n_heads), generator=gen).float() if coarse  # many ties
              else torch.randn(n, n_heads, generator=gen))
    aucs = auc_per_head(scores, labels)
    for h in range(n_heads):
        assert abs(aucs[h].item() - _auc_by_pairs(scores[:, h].tolist(), labels.tolist())) < 1e-12


def test_select_heads_finds_planted_heads_and_symmetric_option():
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(200, generator=gen) < 0.4
    scores = torch.randn(200, 10, generator=gen)
    scores[:, 6] += 2.0 * labels          # high on positives
    scores[:, 2] -= 3.0 * labels          # low on positives: only the symmetric rank sees it
    top, aucs = select_heads_by_auc(scores, labels, top_k=2)
    assert top[0].item() == 6 and 2 not in top.tolist()
    assert aucs[2] < 0.1 and aucs[6] > 0.8
    top_sym, aucs_sym = select_heads_by_auc(scores, labels, top_k=2, symmetric=True)
    assert set(top_sym.tolist()) == {2, 6}
    torch.testing.assert_close(aucs, aucs_sym)
    with pytest.raises(UserError, match="both labels"):
        select_heads_by_auc(scores, torch.ones(200, dtype=torch.bool), top_k=1)
    with pytest.raises(UserError, match="top_k"):
        select_heads_by_auc(scores, labels, top_k=11)


def test_capture_nests_inside_the_signal_capture():
    """One forward gives logits, WAAD / FAI signals and QK-scores, each as when alone."""
    from attnrl.signals import SignalCapture, compute_token_signals
    from attnrl.signals.types import SignalConfig

    model = build_tiny_model("qwen2", num_heads=4, num_kv_heads=2, num_layers=3)
    ids, mask = _batch(13)
    response = torch.zeros_like(mask, dtype=torch.bool)
    response[:, 8:] = True
    config = SignalConfig(layers=[1, 2], h_lo=2, h_hi=4, window=3)
    heads = [(0, 2), (2, 1)]
    qpos, kpos = torch.arange(8, 14), torch.arange(5, 8)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with SignalCapture(model, config, response_mask=response, attention_mask=mask) as sig:
            with QKCapture(model, heads, qpos, kpos) as cap:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            assert model.config._attn_implementation == "attnrl_capture"
            together = sig.token_signals()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits[mask.bool()], plain[mask.bool()], rtol=0, atol=1e-5)
    torch.testing.assert_close(cap.scores, qk_scores(model, ids, mask, qpos, kpos, heads=heads))
    alone = compute_token_signals(model, ids, mask, response, config=config)
    torch.testing.assert_close(together.waad, alone.waad)
    torch.testing.assert_close(together.fai, alone.fai)


def test_scores_under_bf16_autocast_are_float32_products_of_the_bf16_q_k():
    """bf16 weights inside torch.autocast(bfloat16) (a trainer's mixed precision): the
    scores are the float64 products of the layer's own bf16 q / k within the float32 rule,
    not bf16 products."""
    from tolerances import assert_close

    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=2,
                             head_dim=128).bfloat16()
    ids, mask = _batch(3, length=40)
    heads = [(1, 0), (1, 3)]
    qpos, kpos = torch.tensor([39, 30]), torch.arange(5, 25)
    capture = QKCapture(model, heads, qpos, kpos)
    seen = {}
    original = capture.record

    def record(layer, query, key):  # keep the tensors the capture receives; it still runs
        seen.setdefault(layer, (query.detach().clone(), key.detach().clone()))
        return original(layer, query, key)

    capture.record = record
    with torch.no_grad(), capture, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    q, k = seen[1]
    assert q.dtype == torch.bfloat16 and capture.scores.dtype == torch.float32
    expect = torch.einsum("bhqd,bhkd->bhqk", q[:, [0, 3]][:, :, qpos].double(),
                          k[:, [0, 1]][:, :, kpos].double())
    valid = mask.bool()[:, qpos][:, None, :, None] & mask.bool()[:, kpos][:, None, None, :]
    assert_close(capture.scores[valid.expand_as(expect)], expect[valid.expand_as(expect)],
                 terms=128)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_checkpointed_training_forward_is_refused_unless_the_recompute_runs_the_same(
        implementation):
    """Under gradient checkpointing the recompute runs after the capture, with the model's
    own attention: for an eager model that would differ from the capture's sdpa (and read
    an sdpa mask), so it is refused; an sdpa model recomputes exactly what ran, and its
    gradients equal those without checkpointing."""
    ids, mask = _batch(7)

    def grads(checkpointing):
        model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=2,
                                 attn_implementation=implementation)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        with QKCapture(model, [(1, 3)], torch.tensor([13]), torch.arange(14)) as cap:
            loss = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].square().mean()
        (loss + cap.scores.nan_to_num().sum() * 0).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    if implementation == "eager":
        with pytest.raises(UserError, match="attn_implementation 'eager' under gradient "
                                            "checkpointing"):
            grads(True)
        return
    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
