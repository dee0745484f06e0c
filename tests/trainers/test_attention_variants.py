"""Attention variants a job must not train through silently: attention logit softcapping
(Gemma2) is kept when `attnrl train` loads the model, credit that reads the attention of a
softcapped model is refused before it loads, and sampled layers that are linear attention
(config layer_types) are refused from the config. Tiny models built here."""

import json

import pytest
import torch

from attnrl.errors import UserError
from trainers.job import load_config

STRONG = 20.0  # peaked attention, so that softcapping changes the policy a lot


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A saved tiny Gemma2 with attn_logit_softcapping 1.0 (sdpa would ignore it)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                          attn_logit_softcapping=1.0, final_logit_softcapping=None,
                          pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(STRONG)
    out = tmp_path_factory.mktemp("gemma2_softcap")
    model.save_pretrained(out)
    return out


def test_softcapped_model_loads_with_an_attention_that_applies_the_softcap(gemma2_dir):
    """What `attnrl train` loads (attnrl.models.load_model, no implementation named) keeps
    the softcap: its logits are eager's, not sdpa's (which differ by > 0.1 here)."""
    from transformers import AutoModelForCausalLM

    from attnrl.models import load_model
    from trainers.grpo import check_softcapping_kept

    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    model = load_model(gemma2_dir)
    assert model.config._attn_implementation == "eager"
    check_softcapping_kept(model)
    sdpa = AutoModelForCausalLM.from_pretrained(gemma2_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        torch.testing.assert_close(logits, model(input_ids=ids).logits)
        assert (sdpa(input_ids=ids).logits - logits).abs().max() > 0.1
    with pytest.raises(UserError, match="softcaps its attention.*sdpa"):
        check_softcapping_kept(sdpa)
    with pytest.raises(UserError, match="softcaps its attention logits.*'sdpa'"):
        load_model(gemma2_dir, attn_implementation="sdpa")


@pytest.mark.parametrize("credit", ["qk_tokens", "qk_consistency", "qk_premise", "coupled",
                                    "uniform+qk_premise"])
def test_attention_credit_on_a_softcapped_model_is_refused_before_it_loads(gemma2_dir,
                                                                          credit):
    with pytest.raises(UserError, match=r"credit.*attn_logit_softcapping=1.*uniform") as err:
        load_config(None, {"model": str(gemma2_dir), "credit": credit})
    assert "\n" not in str(err.value)
    assert load_config(None, {"model": str(gemma2_dir), "credit": "uniform"})


def test_qk_scores_refuse_a_softcapped_model(gemma2_dir):
    """The QK capture runs its forward with sdpa: on a softcapped model it refuses."""
    from attnrl.models import load_model
    from attnrl.signals.qk import qk_scores

    model = load_model(gemma2_dir)
    ids = torch.randint(3, 256, (1, 12))
    with pytest.raises(UserError, match="softcapping"):
        qk_scores(model, ids, None, torch.tensor([10]), torch.arange(4), layers=[1])


def test_linear_attention_sampled_layers_are_refused_from_the_config(tmp_path):
    """A hybrid model (Qwen3-Next's layer_types: 3 linear-attention layers per full one):
    sampled layers that are linear attention have no attention map; refused before the
    model loads, naming the layers and softmax ones to use instead."""
    types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 3
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_next", "num_hidden_layers": 12, "layer_types": types}))
    with pytest.raises(UserError, match=r"signal_layers \[4, 5, 6, 8\].*linear_attention.*"
                                        r"e\.g\. \[7, 11\]"):
        load_config(None, {"model": str(tmp_path), "credit": "coupled"})  # default layers
    with pytest.raises(UserError, match=r"qk_layers \[2\]"):
        load_config(None, {"model": str(tmp_path), "credit": "qk_tokens", "qk_layers": [2, 3]})
    assert load_config(None, {"model": str(tmp_path), "credit": "coupled",
                              "signal_layers": [3, 7, -1]})
    assert load_config(None, {"model": str(tmp_path), "credit": "entropy"})


def test_attention_credit_table_matches_the_credit_registry():
    """trainers/schema.py's light ATTENTION_CREDIT names exactly the strategies whose
    required inputs read the attention (attnrl.credit)."""
    from attnrl.credit import CREDIT_STRATEGIES, required_inputs
    from trainers.qk_heads import needs_qk
    from trainers.schema import ATTENTION_CREDIT

    for name in CREDIT_STRATEGIES:
        inputs = required_inputs(name)
        expected = "signals" if "signals" in inputs else "qk" if needs_qk(inputs) else None
        assert ATTENTION_CREDIT.get(name) == expected, name
