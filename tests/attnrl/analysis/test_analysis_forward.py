"""The batched analysis forward equals the one-sequence references: signal capture
(compute_token_signals), QK answer scores (qk_scores + response_scores), premise alignment
(premise_alignment), receiver kurtosis (eager receiver_kurtosis), the receivers' token
profile (loops over the eager attention map), log-probs (a plain forward); and it never
builds an (N, N) attention map."""

import itertools

import numpy as np
import torch

from attnrl.analysis.forward import Sample, analyse_samples, response_signals
from attnrl.models import build_tiny_model
from attnrl.signals import compute_token_signals
from attnrl.signals.qk import premise_alignment, qk_scores
from attnrl.signals.qk_select import answer_positions, key_positions, response_scores
from attnrl.signals.receiver import receiver_kurtosis
from attnrl.signals.types import SignalConfig
from tests.attnrl.analysis.test_receivers import ref_profile
from tests.tolerances import assert_close

EOS = [2]


def make_samples(seed=0, count=5, vocab=512):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        p = int(torch.randint(4, 12, (1,), generator=gen))
        n = int(torch.randint(16, 40, (1,), generator=gen))
        prompt = torch.randint(4, vocab, (p,), generator=gen).tolist()
        response = torch.randint(4, vocab, (n,), generator=gen).tolist()
        if i % 2 == 0:
            response[-1] = EOS[0]
        cuts = list(range(0, n, 5)) + [n]
        spans = list(itertools.pairwise(cuts)) if i != 1 else None
        samples.append(Sample(prompt, response, group=i // 2, correct=i % 2 == 0, spans=spans))
    return samples


def test_batched_forward_matches_single_sequence_references():
    model = build_tiny_model(num_layers=4, num_heads=4, num_kv_heads=2)
    samples = make_samples()
    config = SignalConfig(layers=[0, 1, 2, 3], h_hi=None)
    results = analyse_samples(model, samples, config, EOS, max_batch_tokens=120)
    for sample, result in zip(samples, results):
        p, n = len(sample.prompt_ids), len(sample.response_ids)
        ids = torch.tensor([sample.prompt_ids + sample.response_ids])
        resp = torch.zeros_like(ids, dtype=torch.bool)
        resp[0, p:] = True
        prompt = ~resp
        # per-layer WAAD / FAI of the sampled-layer aggregation
        ref = compute_token_signals(model, ids, None, resp, config)
        mine, _ = response_signals([result], [0, 1, 2, 3], (ref.local_heads, ref.global_heads),
                                   config)
        assert_close(mine.waad[0, :n], ref.waad[0, p:], terms=n)
        assert_close(mine.fai[0, :n], ref.fai[0, p:], terms=n)
        assert torch.equal(mine.anchor_mask[0, :n], ref.anchor_mask[0, p:])
        # answer-query score
        answer = answer_positions(ids, resp, EOS)
        keys = key_positions(torch.ones_like(ids), answer)
        scores = qk_scores(model, ids, None, answer[:, None], keys)[:, :, 0, :]
        r = response_scores(scores).view(4, 4)
        assert_close(torch.from_numpy(result.answer_score), r, scale=10)
        # premise alignment, every head
        heads = [(l, h) for l in range(4) for h in range(4)]
        premise = premise_alignment(model, ids, None, prompt, resp, heads)[0, :, p:]
        assert_close(torch.from_numpy(result.premise).reshape(16, n), premise, scale=10)
        # log-probs
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, p - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, p:, None]).squeeze(-1)
        assert_close(torch.from_numpy(result.logprobs), lp, terms=512)
        # receiver kurtosis vs the eager reference
        if sample.spans is None:
            assert result.receiver is None
        else:
            spans = [(a + p, b + p) for a, b in sample.spans]
            ref_k = receiver_kurtosis(model, ids, spans)
            np.testing.assert_allclose(result.receiver, ref_k.numpy(), rtol=1e-3, atol=1e-3)
            assert result.extra["spans"] == sample.spans
            attention = eager_attention(model, ids)                       # (L, H, N, N)
            for layer in range(4):
                ref_u = ref_profile(attention[layer], spans)[:, p:]
                got = result.receiver_profile[layer]
                assert np.array_equal(np.isnan(got), np.isnan(ref_u))
                np.testing.assert_allclose(got[~np.isnan(ref_u)], ref_u[~np.isnan(ref_u)],
                                           rtol=1e-4, atol=1e-6)


def eager_attention(model, ids) -> np.ndarray:
    """(L, H, N, N) float64 attention weights of one sequence (eager attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([a[0] for a in out.attentions]).double().numpy()


def test_sampled_responses_get_the_temperature_1_logprob_baseline(tiny_model_dir):
    """Sampled at T = 0.6, top-p 0.5 (the engine reports log-probs of that processed
    distribution), the analysis still uses the model's own T = 1 log-probs from its
    forward, as for a --responses file: both modes share one baseline."""
    from attnrl.analysis.collect import sample_task
    from attnrl.models import load_model, load_tokenizer
    from attnrl.rollout.hf import processed_logprobs

    samples, _, _ = sample_task(str(tiny_model_dir), "chain_sum", 2, 2, 0.6, 0.5, 12, 0, "hf")
    model = load_model(tiny_model_dir)
    eos = [load_tokenizer(tiny_model_dir).eos_token_id]
    results = analyse_samples(model, samples, SignalConfig(layers=[0, 1], h_hi=None), eos)
    differs = False
    for sample, result in zip(samples, results):
        ids = torch.tensor([sample.prompt_ids + sample.response_ids])
        p = len(sample.prompt_ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, p - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, p:, None]).squeeze(-1)
        assert_close(torch.from_numpy(result.logprobs), lp, terms=512)
        engine = processed_logprobs(logits, 0.6, 0.5).gather(-1, ids[0, p:, None]).squeeze(-1)
        differs |= not torch.allclose(engine, lp, atol=1e-3)
    assert differs           # the engine's processed values are another quantity


def test_forward_of_2048_tokens_never_allocates_a_square_map(monkeypatch):
    """Every tensor any torch op returns during the analysis of one N = 2048 sequence is
    checked: none has two trailing dims of at least N (an N x N map, mask or scores)
    except the model's own boolean attention mask."""
    model = build_tiny_model(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    n = 2048
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (n,), generator=gen).tolist()
    sample = Sample(ids[:48], ids[48:], group=0, correct=True,
                    spans=[(a, min(a + 100, n - 48)) for a in range(0, n - 48, 100)])
    big = []

    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point() \
                        and t.shape[-1] >= n - 1 and t.shape[-2] >= n - 1:
                    big.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
            return out

    config = SignalConfig(layers=[0, 1], h_hi=None)
    with Watch():
        results = analyse_samples(model, [sample], config, EOS, max_batch_tokens=4096)
    assert results[0].receiver is not None and results[0].waad_heads.shape[-1] == n - 48
    assert not big, big[:5]
    # the watch sees square maps where they exist: eager attention of the same sequence
    model.set_attn_implementation("eager")
    with Watch(), torch.no_grad():
        model(input_ids=torch.tensor([ids[:n]]), use_cache=False)
    assert big
