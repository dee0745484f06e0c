"""Every strategy's gamma in `attnrl fidelity` is the trainer's: the same signals, entropy and
QK scores of a problem's batch, sliced to each response; QK heads come from the other half
of the problems only. Checked against direct calls of the library's reference paths on tiny
MHA and GQA models, in float32 and in bf16 under autocast."""

import numpy as np
import pytest
import torch
from tolerances import tolerance

from attnrl.credit import CreditConfig, compute_gamma
from attnrl.credit_names import within_response_problem, within_response_strategies
from attnrl.fidelity.values import CutResponse
from attnrl.fidelity.weights import strategy_weights
from attnrl.models import build_tiny_model
from attnrl.signals.capture import compute_token_signals
from attnrl.signals.types import SignalConfig

SIGNAL_STRATEGIES = ["coupled", "global_anchor", "local_chunk", "bottom_q"]


def _cuts(seed=0, problems=4, per_problem=3, vocab=500):
    rng = np.random.default_rng(seed)
    cuts = []
    for p in range(problems):
        prompt = rng.integers(5, vocab, size=int(rng.integers(4, 9))).tolist()
        for r in range(per_problem):
            n = int(rng.integers(12, 30))
            response = rng.integers(5, vocab, size=n).tolist()
            cuts.append(CutResponse(p, prompt, response, bool((p + r) % 2), [0, n // 2, n]))
    return cuts


def _batch(cuts, rows):
    width = max(len(cuts[i].prompt_ids) + len(cuts[i].response_ids) for i in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.bool)
    response = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, i in enumerate(rows):
        p, n = len(cuts[i].prompt_ids), len(cuts[i].response_ids)
        ids[b, :p + n] = torch.tensor(cuts[i].prompt_ids + cuts[i].response_ids)
        attention[b, :p + n] = True
        response[b, p:p + n] = True
    return ids, attention, response


def _credit(layers=(1, 2)):
    return CreditConfig(signals=SignalConfig(layers=list(layers), h_lo=2, h_hi=8, window=4))


@pytest.mark.parametrize("kv_heads", [4, 2])       # MHA and GQA
def test_signal_strategies_equal_the_capture_of_the_same_batch(kv_heads):
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=kv_heads).eval()
    cuts, credit = _cuts(), _credit()
    gammas, _ = strategy_weights(model, cuts, SIGNAL_STRATEGIES + ["uniform"], credit, 1.0,
                                 [2, 3])
    for problem in range(4):
        rows = [i for i, c in enumerate(cuts) if c.problem == problem]
        ids, attention, response = _batch(cuts, rows)
        signals = compute_token_signals(model, ids, attention, response, credit.signals)
        for name in SIGNAL_STRATEGIES:
            ref = compute_gamma(CreditConfig(strategy=name, signals=credit.signals), signals,
                                response)
            for b, i in enumerate(rows):
                assert np.array_equal(gammas[name][i], ref[b][response[b]].numpy()), name
                assert gammas[name][i].shape == (len(cuts[i].response_ids),)
        for i in rows:
            assert (gammas["uniform"][i] == 1.0).all()
    # the strategies mark tokens: not all equal to 1 everywhere
    assert any((g > 1).any() for g in gammas["coupled"])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_strategy_marks_the_top_entropy_tokens_of_a_full_forward(temperature):
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2).eval()
    cuts, credit = _cuts(1), _credit()
    gammas, _ = strategy_weights(model, cuts, ["entropy"], credit, temperature, [2, 3])
    from attnrl.signals.types import top_q_mask

    for problem in range(4):
        rows = [i for i, c in enumerate(cuts) if c.problem == problem]
        ids, attention, response = _batch(cuts, rows)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention.long()).logits.double()
        logp = torch.log_softmax(logits / temperature, -1)
        ent = -(logp.exp() * logp).sum(-1)                     # (B, N): next-token entropy
        reference = torch.zeros(response.shape, dtype=torch.float64)
        reference[:, 1:] = ent[:, :-1]                          # entropy that drew token t
        marks = top_q_mask(reference.float(), response, credit.q)
        for b, i in enumerate(rows):
            assert np.array_equal(gammas["entropy"][i] > 1, marks[b][response[b]].numpy())


def test_entropy_matches_reference_values():
    from attnrl.fidelity.weights import _entropy

    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2).eval()
    cuts = _cuts(2)
    ids, attention, response = _batch(cuts, [0, 1, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention.long(), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logp = torch.log_softmax(out.logits.double() / 0.7, -1)
    ent = _entropy(model, hidden, ids, response, 0.7)
    ref = -(logp.exp() * logp).sum(-1)
    tol = tolerance(torch.float32, scale=10)
    for b in range(3):
        cols = response[b].nonzero().squeeze(-1)
        torch.testing.assert_close(ent[b, cols].double(), ref[b, cols - 1], rtol=tol.rtol,
                                   atol=tol.atol)


def test_qk_heads_are_selected_on_the_other_half_only():
    """Flipping the outcomes of one half's responses leaves that half's own QK credit (heads
    chosen on the other half) unchanged, and changes the other half's."""
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2).eval()
    cuts, credit = _cuts(3, problems=8, per_problem=2), _credit()
    first, info = strategy_weights(model, cuts, ["qk_tokens"], credit, 1.0, [2, 3], qk_top_k=2)
    assert all(h["selected"] is not None and len(h["selected"]) == 2
               for h in info["qk_heads"].values())
    from attnrl.analysis.stats import split_groups

    halves = split_groups(np.array([c.problem for c in cuts]), len(cuts), seed=0)
    flipped = [CutResponse(c.problem, c.prompt_ids, c.response_ids,
                           (not c.correct) if i in set(halves[0].tolist()) else c.correct,
                           c.bounds) for i, c in enumerate(cuts)]
    second, info2 = strategy_weights(model, flipped, ["qk_tokens"], credit, 1.0, [2, 3],
                                     qk_top_k=2)
    assert info2["qk_heads"]["half0"] == info["qk_heads"]["half0"]
    for i in halves[0].tolist():
        assert np.array_equal(first["qk_tokens"][i], second["qk_tokens"][i])


def test_bf16_weights_under_autocast_give_the_same_shapes_and_range():
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2,
                             dtype=torch.bfloat16).eval()
    cuts, credit = _cuts(4), _credit()
    gammas, _ = strategy_weights(model, cuts, ["coupled", "entropy", "random"], credit, 1.0,
                                 [2, 3], autocast_dtype=torch.bfloat16)
    for per_response in gammas.values():
        for cut, gamma in zip(cuts, per_response):
            assert gamma.shape == (len(cut.response_ids),)
            assert np.isfinite(gamma).all() and gamma.min() >= 1.0 and gamma.max() <= 1.5


def test_strategies_without_within_response_credit_are_not_measured():
    assert within_response_problem("sign_flip") and within_response_problem("qk_consistency")
    assert within_response_problem("coupled") is None
    assert within_response_problem("coupled+qk_consistency") is None
    assert "sign_flip" not in within_response_strategies()
    assert "coupled" in within_response_strategies()


def test_a_qk_strategy_composed_with_entropy_or_random_is_measured():
    """Only QK + signal strategies are refused: a QK strategy joined with entropy or random
    gets its gamma (the QK path passes the entropy and the credit generator)."""
    from attnrl.errors import UserError
    from attnrl.fidelity.cli import _strategies

    assert _strategies("qk_tokens+entropy,qk_premise+random") == ["qk_tokens+entropy",
                                                                   "qk_premise+random"]
    with pytest.raises(UserError, match="attention signals"):
        _strategies("coupled+qk_tokens")
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2).eval()
    cuts, credit = _cuts(3, problems=8, per_problem=2), _credit()
    gammas, _ = strategy_weights(model, cuts, ["qk_tokens+entropy"], credit, 1.0, [2, 3],
                                    qk_top_k=2)
    measured = [g for g in gammas["qk_tokens+entropy"] if g is not None]
    assert len(measured) == len(cuts)
    # composed and clipped to [0, gamma_amp]; both parts amplify, so some tokens reach 1.5
    assert all(g.min() >= 1.0 and g.max() <= 1.5 for g in measured)
    assert any((g > 1).any() for g in measured)
