"""AttnGRPOTrainer on a tiny model: per-token advantages reach TRL's loss, uniform credit is
TRL's GRPO exactly, one step moves every parameter, bad configs fail before loading."""

import copy

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from attnrl.credit import compute_gamma, shape_advantages
from attnrl.errors import UserError
from attnrl.models import build_tiny_model, build_tiny_tokenizer
from attnrl.signals.reference import reference_token_signals
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer
from trainers.job import load_config, parse_overrides

COMMON = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
              report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
              learning_rate=1e-3, seed=0)


def length_reward(prompts, completions, **_):
    """A reward that varies inside a group, so advantages are non-zero."""
    return [float(len(c) % 5) for c in completions]


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"Question: what is {a} + {b}?"}
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])


def make_trainer(cls, config_cls, tmp_path, dataset, model=None, **overrides):
    model = model if model is not None else build_tiny_model("llama", num_heads=4,
                                                             num_kv_heads=2, num_layers=4)
    if config_cls is AttnGRPOConfig:
        overrides.setdefault("rollout_engine", "hf")
    args = config_cls(output_dir=str(tmp_path), **{**COMMON, **overrides})
    tokenizer = build_tiny_tokenizer()
    kwargs = {"rollout_engine": _engine(model, tokenizer)} if cls is AttnGRPOTrainer else {}
    return cls(model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset,
               processing_class=tokenizer, **kwargs)


def _engine(model, tokenizer):
    from attnrl.rollout.hf import HFEngine

    return HFEngine(copy.deepcopy(model).eval(), tokenizer)


def fixed_batch(trainer, seed=0, batch=4, prompt_len=7, completion_len=12):
    """A hand-made rollout batch (left-padded prompts, right-padded completions)."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :4] = 0
    completion_ids = torch.randint(5, vocab, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 9:] = 0
    completion_mask[2, 5:] = 0
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": advantages, "num_items_in_batch": completion_mask.sum()}


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"])
def test_uniform_credit_reproduces_trl_loss_and_gradients(tmp_path, dataset, loss_type):
    base = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=4, seed=1)
    ours = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path / "a", dataset,
                        model=copy.deepcopy(base), credit="uniform", loss_type=loss_type)
    trl = make_trainer(GRPOTrainer, GRPOConfig, tmp_path / "b", dataset,
                       model=copy.deepcopy(base), loss_type=loss_type)
    inputs = fixed_batch(ours)
    loss_a, grads_a = loss_and_grads(ours, inputs)
    loss_b, grads_b = loss_and_grads(trl, inputs)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    # the advantages that reached the loss: A_i on every response token, 0 on padding
    expected = inputs["advantages"][:, None] * inputs["completion_mask"]
    torch.testing.assert_close(ours.last_token_advantages, expected.float())


@pytest.mark.parametrize("credit", ["coupled", "local_chunk", "global_anchor"])
def test_token_advantages_equal_reference_signals(tmp_path, dataset, credit):
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peaked attention: token rankings far from float-noise ties
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.12)
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, model=model,
                           credit=credit, signal_h_lo=2, signal_h_hi=6, signal_window=4)
    inputs = fixed_batch(trainer, completion_len=12)
    loss_and_grads(trainer, inputs)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    response = torch.zeros_like(attention_mask, dtype=torch.bool)
    response[:, inputs["prompt_ids"].shape[1]:] = inputs["completion_mask"].bool()
    signals = reference_token_signals(trainer.model, input_ids, attention_mask, response,
                                      trainer.credit_config.signals)
    gamma = compute_gamma(trainer.credit_config, signals, response)
    expected = shape_advantages(trainer.credit_config, inputs["advantages"], gamma, response)
    expected = expected[:, inputs["prompt_ids"].shape[1]:]
    torch.testing.assert_close(trainer.last_token_advantages, expected, atol=1e-5, rtol=0)
    amplified = (gamma > 1) & response
    assert amplified.any(), "credit strategy marked no token: the check would be vacuous"


@pytest.mark.parametrize("credit", ["coupled", "qk_consistency"])
def test_micro_batch_without_response_tokens_trains_on(tmp_path, dataset, credit):
    """Every completion masked (all truncated, mask_truncated_completions): TRL's loss is 0;
    the credit runs with gamma = 1 and logs no signal metrics instead of failing."""
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, credit=credit,
                           mask_truncated_completions=True)
    inputs = fixed_batch(trainer)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    loss, grads = loss_and_grads(trainer, inputs)
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.equal(trainer.last_token_advantages, torch.zeros(4, 12))
    metrics = trainer._metrics["train"]
    assert metrics["credit/gamma_mean"] == [0.0]
    assert not any(key.startswith("signals/") for key in metrics)
    # the next micro-batch with response tokens gets its signals again
    loss_and_grads(trainer, fixed_batch(trainer))
    if credit == "coupled":
        assert len(metrics["signals/waad_mean"]) == 1
        assert metrics["signals/path_kernel"] == [1.0]  # training forward: beside sdpa


def test_attention_the_capture_cannot_compute_is_refused_before_training(tmp_path, dataset):
    """Gemma2 with logit softcapping: the signal capture would run a different policy, so a
    credit strategy that reads attention signals is refused when the trainer is built."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, attn_logit_softcapping=50.0, pad_token_id=0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    with pytest.raises(UserError, match=r"Gemma2ForCausalLM.*softcapping"):
        make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, model=model,
                     credit="coupled")
    make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, model=model,
                 credit="uniform")  # no signals read: trains as TRL would


def test_one_step_changes_every_parameter(tmp_path, dataset):
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, credit="coupled",
                           max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters unchanged after one step: {unchanged}"
    # the engine got the new weights before the next generation
    trainer.sync_engine_weights()
    engine_state = trainer.engine.model.state_dict()
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(engine_state[name], param.detach())


def test_config_errors_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'learning_rat'.*did you mean "
                                        "'learning_rate'"):
        load_config(None, {"learning_rat": 1e-5})
    with pytest.raises(UserError, match="unknown credit strategy 'coupeld'.*coupled"):
        load_config(None, {"credit": "coupeld"})
    with pytest.raises(UserError, match="unknown advantage_estimator 'grpoo'.*grpo"):
        load_config(None, {"advantage_estimator": "grpoo"})
    from attnrl.models import save_tiny_model

    path = save_tiny_model(tmp_path / "m", num_layers=4)
    with pytest.raises(UserError, match=r"signal_layers \[7\] out of range.*4 layers"):
        load_config(None, {"model": str(path), "signal_layers": [1, 7]})


def test_overrides_parse_yaml_scalars():
    parsed = parse_overrides(["--learning_rate", "1e-5", "--signal_layers", "[1, 2]",
                              "--credit=coupled", "--bf16"])
    assert parsed == {"learning_rate": 1e-5, "signal_layers": [1, 2], "credit": "coupled",
                      "bf16": True}


def test_multi_objective_aggregation_other_than_sum_is_refused(tiny_model_dir, tmp_path,
                                                               capsys):
    """attnrl's estimators see the weighted sum of the rewards: TRL's 'normalize_then_sum'
    would be ignored, so it stops the job before any model loads (exit 2, one line)."""
    from pathlib import Path

    from attnrl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    code = main(["train", "--config", str(config), "--model", str(tiny_model_dir),
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                 "--multi_objective_aggregation", "normalize_then_sum"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "multi_objective_aggregation 'normalize_then_sum' is not supported" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    args = AttnGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                          multi_objective_aggregation="sum_then_normalize")
    assert args.multi_objective_aggregation == "sum_then_normalize"


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_importance_sampling_correction_runs_and_is_one_on_the_first_step(tmp_path, dataset,
                                                                         mode):
    """TRL's truncated IS correction (on by default, as in TRL) runs on the engine's
    log-probs: at temperature 0.7 the engine's log-probs are TRL's temperature-scaled
    ones, so on the first step (same weights on both sides) every per-token ratio is 1.
    float32 on both sides (TRL's default bf16 autocast would itself be a mismatch)."""
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, max_steps=1,
                           temperature=0.7, vllm_importance_sampling_mode=mode, bf16=False)
    assert trainer.args.vllm_importance_sampling_correction  # TRL's default
    trainer.train()
    (row,) = [r for r in trainer.state.log_history if "sampling/importance_sampling_ratio/mean"
              in r]
    assert row["sampling/sampling_logp_difference/max"] <= 1e-5, row
    for key in ("min", "mean", "max"):
        assert abs(row[f"sampling/importance_sampling_ratio/{key}"] - 1.0) <= 1e-4, row


def test_importance_sampling_ratio_weights_the_loss(tmp_path, dataset):
    """A batch that carries TRL's IS ratio has its per-token loss multiplied by it (as in
    TRL's vLLM path); a hand-made batch without sampler log-probs is not reweighted."""
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset)
    inputs = fixed_batch(trainer)
    plain, _ = loss_and_grads(trainer, inputs)
    ones = torch.ones(inputs["completion_ids"].shape[0], 1)
    same, _ = loss_and_grads(trainer, {**inputs, "importance_sampling_ratio": ones})
    scaled, _ = loss_and_grads(trainer, {**inputs, "importance_sampling_ratio": 0.5 * ones})
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(scaled, 0.5 * plain)


def test_prompt_order_of_each_epoch_depends_only_on_seed_and_epoch(tmp_path, dataset):
    """Epoch 0 is TRL's own order; a fresh sampler set to epoch e (a resumed run) yields the
    order an uninterrupted one reaches at epoch e (TRL's continues one generator, so its
    fresh copy repeats epoch 0's order)."""
    from trl.trainer.utils import RepeatSampler

    from trainers.grpo import EpochSeededRepeatSampler

    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset,
                           model=build_tiny_model("llama", num_layers=1))
    sampler = trainer._get_train_sampler()
    assert type(sampler) is EpochSeededRepeatSampler
    kwargs = {"data_source": dataset, "mini_repeat_count": 4, "batch_size": 1,
              "repeat_count": 1, "seed": 0}
    trl = RepeatSampler(**kwargs)
    trl_epochs = [list(trl) for _ in range(3)]
    assert list(sampler) == trl_epochs[0]
    uninterrupted = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        uninterrupted.append(list(sampler))
    assert len({tuple(e) for e in uninterrupted}) > 1  # the order changes between epochs
    for epoch in (1, 2):
        resumed = trainer._get_train_sampler()
        resumed.set_epoch(epoch)
        assert list(resumed) == uninterrupted[epoch]
    # why: a fresh TRL sampler (a resumed process) restarts at epoch 0's order
    assert list(RepeatSampler(**kwargs)) == trl_epochs[0] != trl_epochs[1]


def test_resume_does_not_warn_about_the_tied_output_embedding(tmp_path, dataset, caplog):
    """A tied lm_head is not saved, so every resume reported it missing; a key that is
    really missing still warns."""
    import logging

    model = build_tiny_model("llama", num_layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, model=model)
    state = {k: v for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"}
    result = trainer.model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"]
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._issue_warnings_after_load(result)
    assert "missing keys" not in caplog.text
    del state["model.norm.weight"]
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._issue_warnings_after_load(trainer.model.load_state_dict(state, strict=False))
    assert "missing keys" in caplog.text and "model.norm.weight" in caplog.text
    assert "lm_head" not in caplog.text
