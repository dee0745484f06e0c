"""QK-score credit in AttnGRPOTrainer: the per-token advantages reaching TRL's loss equal a
reference built from eager attention's q.k (qk_scores on an eager copy of the policy) and the
documented formulas applied literally; config validation; one real training step; the head
selection survives a checkpoint resume."""

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from attnrl.credit import compute_gamma
from attnrl.errors import UserError
from attnrl.models import build_tiny_model, build_tiny_tokenizer
from attnrl.signals.qk import all_heads, qk_scores
from attnrl.signals.reference import reference_token_signals
from attnrl.signals.types import SignalConfig
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer
from trainers.job import load_config

COMMON = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
              report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
              learning_rate=1e-3, seed=0, rollout_engine="hf", gradient_checkpointing=False,
              signal_h_lo=2, signal_h_hi=6, signal_window=4, qk_top_k=3, bf16=False)
NUM_LAYERS = 4
LABELS = torch.tensor([True, False, True, False, True, True, False, False])
ADVANTAGES = torch.tensor([1.1, -0.6, 0.5, -1.3, 0.8, 0.2, -0.4, -0.9])


def length_reward(prompts, completions, **_):
    """Varies inside a group: some completions count as correct (reward >= 1), some not."""
    return [float(len(c) % 3 == 0) for c in completions]


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"Question: what is {a} + {b}?"}
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])


def make_trainer(tmp_path, dataset, **overrides):
    from attnrl.rollout.hf import HFEngine

    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=NUM_LAYERS,
                             seed=3)
    tokenizer = build_tiny_tokenizer()
    args = AttnGRPOConfig(output_dir=str(tmp_path), **{**COMMON, **overrides})
    return AttnGRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                           train_dataset=dataset, processing_class=tokenizer,
                           rollout_engine=HFEngine(copy.deepcopy(model).eval(), tokenizer))


def rollout_batch(trainer, seed=0, batch=8, prompt_len=7, completion_len=12):
    """Left-padded prompts, completions ending in EOS (mask through the EOS) or cut at the
    length limit, with correctness labels and advantages."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    eos = trainer.eos_token_ids[0]
    prompt_ids = torch.randint(5, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.randint(5, vocab, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row in range(batch):
        prompt_mask[row, :row % 4] = 0
        length = [9, 12, 6, 12, 11, 8, 12, 10][row]
        completion_mask[row, length:] = 0
        if length < completion_len:
            completion_ids[row, length - 1] = eos
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": ADVANTAGES.clone(), "qk_correct": LABELS.clone(),
            "num_items_in_batch": completion_mask.sum()}


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach()


# ---- the reference: eager q.k, then the documented formulas, literally -------------------

def reference_gamma(trainer, inputs, strategy):
    prompt_len = inputs["prompt_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).bool()
    response = torch.zeros_like(attention)
    response[:, prompt_len:] = inputs["completion_mask"].bool()
    batch, length = ids.shape
    eos = set(trainer.eos_token_ids)
    # a separate eager model with the policy's weights (a deepcopy of the trainer's model
    # would keep calling the original's forward, which accelerate wraps)
    eager = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=NUM_LAYERS,
                             attn_implementation="eager")
    eager.load_state_dict(trainer.model.state_dict())
    layers = SignalConfig().resolve_layers(NUM_LAYERS)
    heads = all_heads(eager, layers)
    assert trainer.qk_credit.selector.heads == heads

    # answer position: last response token that is not EOS
    answer = []
    for b in range(batch):
        content = [t for t in range(length) if response[b, t] and int(ids[b, t]) not in eos]
        answer.append(content[-1])
    raw = qk_scores(eager, ids, attention.long(), torch.tensor(answer)[:, None],
                    torch.arange(length), heads=heads)[:, :, 0, :].double()

    # r_ih: mean over non-padding keys s <= a_i; AUC per head; top-k (ties: lower index)
    r = [[sum(float(raw[b, h, s]) for s in range(answer[b] + 1) if attention[b, s])
          / sum(1 for s in range(answer[b] + 1) if attention[b, s])
          for h in range(len(heads))] for b in range(batch)]
    labels = inputs["qk_correct"].tolist()
    auc = []
    for h in range(len(heads)):
        pos = [r[b][h] for b in range(batch) if labels[b]]
        neg = [r[b][h] for b in range(batch) if not labels[b]]
        auc.append(sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
                   / (len(pos) * len(neg)))
    k = trainer.args.qk_top_k
    chosen = sorted(range(len(heads)), key=lambda h: (-auc[h], h))[:k]
    assert trainer.qk_credit.selector.selected.tolist() == chosen

    gamma = torch.ones(batch, length, dtype=torch.float64)
    amp, q = trainer.args.gamma_amp, trainer.args.signal_q
    if strategy == "qk_tokens":  # top ceil(q n) of u_t = mean_sel q_a . k_t, t <= a
        for b in range(batch):
            eligible = [t for t in range(length) if response[b, t] and t <= answer[b]]
            u = {t: sum(float(raw[b, h, t]) for h in chosen) / k for t in eligible}
            count = math.ceil(len(eligible) * q - 1e-9)
            for t in sorted(eligible, key=lambda t: (-u[t], t))[:count]:
                gamma[b, t] = amp
        return gamma, response, chosen, None
    if strategy == "qk_premise":  # top ceil(q n) of p_t = mean_sel mean_{s in prompt} q_t . k_s
        full = qk_scores(eager, ids, attention.long(), torch.arange(length),
                         torch.arange(length), heads=heads).double()          # (B, H, N, N)
        for b in range(batch):
            prompt = [s for s in range(length) if attention[b, s] and not response[b, s]]
            tokens = [t for t in range(length) if response[b, t]]
            p = {t: sum(sum(float(full[b, h, t, s]) for s in prompt) / len(prompt)
                        for h in chosen) / k for t in tokens}
            count = math.ceil(len(tokens) * q - 1e-9)
            for t in sorted(tokens, key=lambda t: (-p[t], t))[:count]:
                gamma[b, t] = amp
        return gamma, response, chosen, None
    # coupled (reference signals) times the consistency factor, clipped to gamma_amp
    signals = reference_token_signals(eager, ids, attention.long(), response,
                                      trainer.credit_config.signals)
    coupled = compute_gamma(trainer.credit_config.__class__(
        strategy="coupled", gamma_amp=amp, signals=trainer.credit_config.signals),
        signals, response).double()
    damp = trainer.args.qk_damp
    factors = []
    for b in range(batch):
        v = 0.0
        for h in chosen:
            col = [r[j][h] for j in range(batch)]
            mean = sum(col) / batch
            std = math.sqrt(sum((c - mean) ** 2 for c in col) / batch)
            v += (r[b][h] - mean) / (std + 1e-6) / k
        a = float(inputs["advantages"][b])
        factor = 1 - damp * math.tanh(max(-v, 0.0) if a > 0 else max(v, 0.0))
        factors.append(factor)
        for t in range(length):
            if response[b, t]:
                gamma[b, t] = min(coupled[b, t] * factor, amp)
    return gamma, response, chosen, factors


@pytest.mark.parametrize("strategy", ["qk_tokens", "qk_premise", "coupled+qk_consistency"])
def test_token_advantages_equal_eager_reference(tmp_path, dataset, strategy):
    trainer = make_trainer(tmp_path, dataset, credit=strategy)
    inputs = rollout_batch(trainer)
    loss = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    gamma, response, chosen, factors = reference_gamma(trainer, inputs, strategy)
    prompt_len = inputs["prompt_ids"].shape[1]
    expected = (gamma * inputs["advantages"][:, None].double() * response)[:, prompt_len:]
    torch.testing.assert_close(trainer.last_token_advantages.double(), expected,
                               atol=1e-5, rtol=0)
    metrics = trainer._metrics["train"]
    ema = trainer.qk_credit.selector.ema_auc
    assert metrics["qk/auc_mean"][-1] == pytest.approx(ema[chosen].mean().item())
    layer, head = trainer.qk_credit.selector.heads[chosen[0]]
    assert f"qk/auc/L{layer}H{head}" in metrics
    if strategy in ("qk_tokens", "qk_premise"):
        assert ((gamma > 1) & response).any(), "no token amplified: the check is vacuous"
        return
    damped = sum(f < 1 for f in factors)
    assert 0 < damped < 8 and ((gamma > 1) & response).any(), "the check would be vacuous"
    assert metrics["qk/frac_damped"][-1] == pytest.approx(damped / 8)


def test_eval_forward_uses_but_never_updates_the_selection(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, credit="qk_tokens")
    loss_and_grads(trainer, rollout_batch(trainer, seed=0))
    state = json.dumps(trainer.qk_credit.selector.state_dict())
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(rollout_batch(trainer, seed=1)))
    assert json.dumps(trainer.qk_credit.selector.state_dict()) == state
    # a second training batch moves the EMA (decay 0.9), the selection waits for step 10
    loss_and_grads(trainer, rollout_batch(trainer, seed=1))
    after = trainer.qk_credit.selector
    assert after.updates == 2 and after.selected_at == 0


def test_config_accepts_qk_strategies_and_checks_qk_layers(tmp_path):
    for strategy in ("qk_tokens", "qk_consistency", "coupled+qk_consistency"):
        assert load_config(None, {"credit": strategy})["credit"] == strategy
    with pytest.raises(UserError, match="unknown credit strategy 'qk_token'.*did you mean"):
        load_config(None, {"credit": "qk_token"})
    from attnrl.models import save_tiny_model

    path = save_tiny_model(tmp_path / "m", num_layers=4)
    with pytest.raises(UserError, match=r"qk_layers \[9\] out of range.*4 layers"):
        load_config(None, {"model": str(path), "credit": "qk_tokens", "qk_layers": [0, 9]})
    with pytest.raises(UserError, match="qk_damp must be in"):
        AttnGRPOConfig(output_dir=str(tmp_path), credit="qk_consistency", qk_damp=2.0,
                       use_cpu=True, report_to="none").credit_config()


@pytest.mark.parametrize("strategy,checkpointing", [("qk_tokens", False),
                                                    ("qk_consistency", True)])
def test_one_training_step_saves_and_resumes_the_selection(tmp_path, dataset, strategy,
                                                           checkpointing):
    # bf16 and gradient checkpointing as TRL's defaults: the capture keeps float32 scores
    # inside the autocast forward, and the backward's recompute records nothing
    trainer = make_trainer(tmp_path, dataset, credit=strategy, max_steps=1, bf16=True,
                           gradient_checkpointing=checkpointing, save_strategy="steps",
                           save_steps=1, qk_layers=[0, -1])
    assert trainer.qk_credit.selector.heads == [(l, h) for l in (0, 3) for h in range(4)]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n])
               for n, p in trainer.model.named_parameters())
    logged = {k for row in trainer.state.log_history for k in row}
    selector = trainer.qk_credit.selector
    assert selector.updates >= 1, "the rollout batch had one label only"
    assert "qk/auc_mean" in logged
    assert ("qk/frac_damped" in logged) == (strategy == "qk_consistency")
    saved = json.loads((tmp_path / "checkpoint-1" / "qk_heads.json").read_text())
    assert saved == json.loads(json.dumps(selector.state_dict()))
    # a new run resuming from the checkpoint starts from the saved selection
    resumed = make_trainer(tmp_path, dataset, credit=strategy, max_steps=2,
                           qk_layers=[0, -1])
    assert resumed.qk_credit.selector.selected is None
    at_start = []

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            at_start.append(json.loads(json.dumps(resumed.qk_credit.selector.state_dict())))

    resumed.add_callback(Snapshot())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert at_start == [saved]
    # step 2 of 2 observed one more batch and kept the selection (re-selection every 10)
    after = resumed.qk_credit.selector
    assert after.selected_heads == selector.selected_heads and after.selected_at == 0
    assert after.updates >= selector.updates


@pytest.mark.slow
def test_killed_run_resumes_with_identical_qk_metrics(tmp_path, tiny_model_dir):
    """A run killed after its step-2 checkpoint, resumed, logs the same step-3/4 metrics as
    an uninterrupted run: the EMA and the selection (re-selected at step 2) come back.
    4 accumulated micro-batches of 8 = 8 of the 16 prompts per step: the checkpoint ends
    epoch 0, so the resumed run must also draw epoch 1's prompt order as the whole run did
    (TRL's sampler alone gave step-3 loss -0.018 instead of -0.029 here)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_resume_worker.py")
    base = {"model": str(tiny_model_dir), "task": "chain_sum", "task_size": 16,
            "credit": "coupled+qk_consistency", "qk_top_k": 2, "qk_reselect_every": 2,
            "rollout_engine": "hf", "report_to": "none", "max_steps": 4, "save_steps": 1,
            "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 16, "learning_rate": 1e-3, "signal_h_lo": 2,
            "signal_h_hi": 8, "gradient_checkpointing": False, "bf16": False,
            "rewards": {"format": 1.0}, "gradient_accumulation_steps": 4,
            "eval_size": 0, "reward_options": {"format": {"pattern": "[A-Z]"}}}

    def run(out, stop_at=0):
        env = dict(os.environ, STOP_AT=str(stop_at), PYTHONPATH=str(Path(__file__).parents[2]))
        return subprocess.run([sys.executable, str(worker),
                               json.dumps({**base, "output_dir": str(tmp_path / out)})],
                              env=env, capture_output=True, text=True, timeout=600)

    def metrics(out):
        rows = [json.loads(line) for line in
                (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "reward" in r}

    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = run("crashed", stop_at=2)
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (tmp_path / "crashed" / "checkpoint-2" / "qk_heads.json").is_file()
    resumed = run("crashed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics("whole"), metrics("crashed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    keys = ("reward", "loss", "grad_norm", "credit/gamma_mean", "qk/auc_mean",
            "qk/frac_damped")
    for step in (3, 4):
        for key in keys:
            assert key in a[step], (step, key)
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    state = json.loads((tmp_path / "whole" / "checkpoint-4" / "qk_heads.json").read_text())
    assert state["selected_at"] == 2 and state["updates"] >= 2  # the EMA was updated, not only initialised
