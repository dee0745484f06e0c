"""The per-token log-probs and entropies of AttnGRPOTrainer's loss forward against the plain
computation from full (tokens x vocabulary) logits.

The loss forward (`AttnGRPOTrainer._get_per_token_logps_and_entropies`, with the signal
capture for attention credit) goes through TRL's fused LM head: the log-probs and entropies
are computed in tiles of tokens x vocabulary and the full logits are never held (on CPU the
tiles are bounded by trainers/fused_head.py). The tiles are shrunk here so that every tile
boundary is crossed (tokens and vocabulary), with and without gradient checkpointing, in float32. Tolerance: values the float32 rule of
tests/tolerances.py (1e-5); gradients rtol 1e-4 and atol 1e-5 x the tensor's largest entry
(sums over tokens and vocabulary in another order).
"""

import copy

import pytest
import torch
from datasets import Dataset
from tolerances import assert_close

from attnrl.models import build_tiny_model, build_tiny_tokenizer
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer

B, PROMPT, K = 4, 6, 24
TEMPERATURE = 0.7


def make_trainer(tmp_path, credit, checkpointing, attn_implementation="sdpa"):
    from attnrl.rollout.hf import HFEngine

    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=4, seed=1,
                             attn_implementation=attn_implementation)
    tokenizer = build_tiny_tokenizer()
    args = AttnGRPOConfig(
        output_dir=str(tmp_path), credit=credit, rollout_engine="hf",
        per_device_train_batch_size=B, num_generations=B, max_completion_length=K,
        report_to="none", use_cpu=True, save_strategy="no", seed=0,
        gradient_checkpointing=checkpointing, temperature=TEMPERATURE, bf16=False,
        signal_window=4, signal_h_lo=2, signal_h_hi=6)
    return AttnGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        args=args, train_dataset=Dataset.from_list([{"prompt": "x"}]),
        processing_class=tokenizer,
        rollout_engine=HFEngine(copy.deepcopy(model).eval(), tokenizer))


def batch(vocab):
    """Left-padded prompts, ragged completions: input_ids, attention_mask (B, PROMPT + K),
    completion_ids and completion_mask (B, K)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, vocab, (B, PROMPT), generator=gen)
    completion = torch.randint(4, vocab, (B, K), generator=gen)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0
    completion_mask = torch.ones_like(completion)
    for row in range(B):
        completion_mask[row, K - 5 * row:] = 0
    input_ids = torch.cat([prompt, completion], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    return input_ids, attention_mask, completion, completion_mask


def full_logits_reference(model, input_ids, attention_mask, completion, mask):
    """log p(token) and entropy from the full (B, K, V) logits / temperature."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False).logits[:, -K - 1:-1].float() / TEMPERATURE
    logp = torch.log_softmax(logits, -1)
    token = logp.gather(-1, completion[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token * mask, entropy * mask


CASES = [("uniform", False, "sdpa"), ("uniform", True, "sdpa"), ("coupled", False, "sdpa"),
         ("coupled", True, "sdpa"), ("coupled", True, "eager")]


@pytest.mark.parametrize("credit,checkpointing,impl", CASES,
                         ids=[f"{c}-{'checkpointed' if k else 'plain'}-{i}" for c, k, i in CASES])
def test_loss_forward_logprobs_and_entropies_equal_full_logits(tmp_path, monkeypatch,
                                                                credit, checkpointing, impl):
    """`impl`: the implementation the model was loaded with (eager + checkpointing + the
    capture: issue 23 item 6, the recompute must replay the capture's calls)."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 16)             # tokens per tile
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 96)  # vocabulary per tile
    trainer = make_trainer(tmp_path, credit, checkpointing, impl)
    model = trainer.model
    if checkpointing:  # what Trainer.train() does first (building the trainer does not)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        assert model.is_gradient_checkpointing
    input_ids, attention_mask, completion, completion_mask = batch(model.config.vocab_size)
    mask = completion_mask.float()
    gen = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.randn(B, K, generator=gen), torch.randn(B, K, generator=gen)
    model.train()

    def objective_grads(logp, entropy):
        (logp * w_logp * mask + entropy * w_ent * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return grads

    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda *_: head_calls.append(1))
    trainer._signal_seconds = 0.0  # as _compute_loss sets before the loss forward
    trainer._loss_inputs = {"advantages": torch.linspace(-1, 1, B),
                            "completion_mask": completion_mask, "completion_ids": completion}
    try:
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, K, compute_entropy=True)
    finally:
        trainer._loss_inputs = None
        hook.remove()
    assert not head_calls, "the loss forward ran the LM head over all positions"
    if credit == "coupled":
        assert set(trainer._metrics["train"]) >= {"signals/path_fused"}
    grads = objective_grads(logp, entropy)

    if checkpointing:
        model.gradient_checkpointing_disable()
    ref_logp, ref_entropy = full_logits_reference(model, input_ids, attention_mask,
                                                  completion, mask)
    ref_grads = objective_grads(ref_logp, ref_entropy)
    real = completion_mask.bool()
    assert_close(logp[real], ref_logp[real])
    assert_close(entropy[real], ref_entropy[real])
    assert torch.equal(logp[~real], torch.zeros_like(logp[~real]))
    for name, grad in ref_grads.items():  # float32 rule at the scale of each tensor
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_cpu_tiles_of_the_fused_head_are_bounded(tmp_path, monkeypatch):
    """On CPU (TRL's torch fallback, about eight tile-sized temporaries per tile) building
    the trainer caps the head's token tile at 64 MiB of float32 per tile."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    from trainers.fused_head import TILE_BYTES

    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 4096)   # TRL's default
    make_trainer(tmp_path, "uniform", False)
    rows = chunked.TOKEN_CHUNK_SIZE
    assert rows * trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE * 4 <= TILE_BYTES and rows >= 64
