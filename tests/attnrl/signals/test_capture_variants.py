"""Attention variants under the capture: the policy's logits with the capture equal those
without it, or the capture refuses with a clear error naming the model and the feature.
Tiny models with random weights, built here: Gemma2 (sliding-window layers, logit
softcapping, query_pre_attn_scalar scaling) and gpt-oss (attention sinks)."""

import pytest
import torch

from attnrl.errors import UserError
from attnrl.signals import SignalCapture, SignalConfig, compute_token_signals
from attnrl.signals import reference as ref


def gemma2(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                          attn_logit_softcapping=softcap, final_logit_softcapping=None,
                          pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # peaked attention, so softcapping changes the policy a lot
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(20)
    return model


def gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                          sliding_window=4, pad_token_id=0)
    torch.manual_seed(0)
    model = GptOssForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 2.0)
    return model


def batch(n=20):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, n), generator=gen)
    attention = torch.ones(2, n, dtype=torch.long)
    attention[1, :5] = 0
    response = torch.zeros(2, n, dtype=torch.bool)
    response[:, 10:] = True
    return ids, attention, response


def test_gemma2_sliding_windows_without_softcap_logits_equal_and_signals_match():
    """Gemma2's sliding-window layers and its own scaling: same logits with the capture,
    signals equal to the reference from eager maps."""
    model = gemma2(softcap=None)
    ids, attention, response = batch()
    config = SignalConfig(layers=[1, 2], window=3, h_lo=2, h_hi=6)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
        with SignalCapture(model, config, response_mask=response) as capture:
            captured = model(input_ids=ids, attention_mask=attention).logits
    real = attention.bool()
    torch.testing.assert_close(captured[real], plain[real], atol=1e-5, rtol=0)
    got = capture.token_signals()
    expect = ref.reference_token_signals(model, ids, attention, response, config)
    torch.testing.assert_close(got.waad, expect.waad, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.fai, expect.fai, atol=1e-5, rtol=0)


def test_softcapping_is_refused_before_any_forward():
    model = gemma2(softcap=1.0)
    ids, attention, response = batch()
    with torch.no_grad():  # the capture's sdpa would give a different policy
        plain = model(input_ids=ids, attention_mask=attention).logits
        model.set_attn_implementation("sdpa")
        assert (model(input_ids=ids, attention_mask=attention).logits - plain).abs().max() > 0.1
    with pytest.raises(UserError, match=r"Gemma2ForCausalLM.*softcapping"):
        SignalCapture(model, SignalConfig(layers=[1]), response_mask=response)
    with pytest.raises(UserError, match=r"Gemma2ForCausalLM.*softcapping"):
        compute_token_signals(model, ids, attention, response, SignalConfig(layers=[1]))


def test_softcap_reaching_the_attention_function_is_refused():
    """A layer that passes `softcap` at run time (its config did not say so) is refused in
    sampled and non-sampled layers alike: sdpa would ignore it."""
    model = gemma2(softcap=None)
    ids, attention, response = batch()
    for module in model.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = 2.0
    for layers in ([0], [3]):
        with (pytest.raises(UserError, match="softcap"), torch.no_grad(),
              SignalCapture(model, SignalConfig(layers=layers), response_mask=response)):
            model(input_ids=ids, attention_mask=attention)
    assert model.config._attn_implementation == "eager"


def test_attention_sinks_are_refused(monkeypatch):
    model = gpt_oss()
    ids, attention, response = batch()
    with pytest.raises(UserError, match=r"GptOssForCausalLM.*sinks"):
        SignalCapture(model, SignalConfig(layers=[1]), response_mask=response)
    # the run-time guard alone (the check above switched off): a layer passing s_aux
    import attnrl.signals.capture as capture_module

    monkeypatch.setattr(capture_module, "check_capture_supported", lambda model: None)
    for layers in ([0], [1]):
        with (pytest.raises(UserError, match=r"GptOssForCausalLM.*sinks \(s_aux\)"),
              torch.no_grad(),
              SignalCapture(model, SignalConfig(layers=layers), response_mask=response)):
            model(input_ids=ids, attention_mask=attention)
