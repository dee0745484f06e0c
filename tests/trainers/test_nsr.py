"""NSRTrainer on a tiny model: which samples receive gradient under nsr / psr / w_reinforce
(checked per sample against a plain autograd reference), the entropy bonus, a short run,
non-binary rewards, composition with credit strategies, and the packaged configs."""

import copy
import dataclasses

import pytest
import torch
from datasets import Dataset

from attnrl.advantages import compute_advantages
from attnrl.credit import CREDIT_STRATEGIES, compute_gamma
from attnrl.errors import UserError
from attnrl.models import build_tiny_model, build_tiny_tokenizer
from attnrl.signals.reference import reference_token_signals
from trainers import machine
from trainers.job import CONFIG_DIR, load_config
from trainers.nsr import NSRConfig, NSRTrainer

COMMON = {"per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 12,
          "report_to": "none", "use_cpu": True, "logging_steps": 1, "save_strategy": "no",
          "learning_rate": 1e-3, "seed": 0, "rollout_engine": "hf",
          "bf16": False}  # float32 forward, so gradients match the plain reference closely
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])   # correct / incorrect per sample
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1])
DEFINITION = {  # methods.md section 3: advantage of a correct / an incorrect response
    "nsr": (0.0, -1.0), "psr": (1.0, 0.0), "w_reinforce": (0.1, -1.0)}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-7}


def parity_reward(prompts, completions, completion_ids, **_):
    """Binary: a completion is 'correct' when its token ids sum to an even number."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def fraction_reward(prompts, completions, completion_ids, **_):
    """Non-binary: 0, 0.5 or 1 by the sum of the token ids."""
    return [(sum(ids) % 3) / 2 for ids in completion_ids]


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"Question: what is {a} + {b}?"}
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])


def make_trainer(tmp_path, dataset, model=None, reward=parity_reward, engine=False,
                 **overrides):
    model = model if model is not None else build_tiny_model(
        "llama", num_heads=4, num_kv_heads=2, num_layers=4, seed=1)
    args = NSRConfig(output_dir=str(tmp_path), **{**COMMON, **overrides})
    tokenizer = build_tiny_tokenizer()
    kwargs = {}
    if engine:
        from attnrl.rollout.hf import HFEngine

        kwargs["rollout_engine"] = HFEngine(copy.deepcopy(model).eval(), tokenizer)
    return NSRTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                      processing_class=tokenizer, **kwargs)


def crafted_batch(trainer, seed=0, prompt_len=7, completion_len=10):
    """Hand-made rollouts for REWARDS (left-padded prompts, right-padded completions) with
    the advantages the trainer's estimator gives them."""
    batch = len(REWARDS)
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    prompt_mask[4, :3] = 0
    completion_ids = torch.randint(5, vocab, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([10, 7, 4, 9, 10, 6]):
        completion_mask[row, length:] = 0
    args = trainer.args
    advantages = compute_advantages(args.advantage_estimator, REWARDS, GROUP_IDS,
                                    **args.estimator_kwargs())
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": advantages, "num_items_in_batch": completion_mask.sum()}


def rows(inputs, index):
    """The batch restricted to the samples `index` (a list of row numbers)."""
    out = {k: v[index] for k, v in inputs.items() if k != "num_items_in_batch"}
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), grads_of(trainer.model)


def grads_of(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def reference_grads(model, inputs, objective, temperature=1.0):
    """Gradient of objective(logp, entropy, mask) computed from a plain forward: logp and
    entropy (B, T) of the completion tokens under softmax(logits / temperature)."""
    model.zero_grad()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -width - 1:-1].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    objective(logp, entropy, inputs["completion_mask"].float()).backward()
    return grads_of(model)


def surrogate_at_ratio_one(advantages):
    """Clipped surrogate at ratio 1, token mean over the batch: its gradient is
    -sum_{i,t} A_i grad log pi(o_{i,t}) / (number of response tokens)."""
    def objective(logp, entropy, mask):
        return -(advantages[:, None] * logp * mask).sum() / mask.sum()
    return objective


def assert_grads_close(actual, expected, scale=1.0, **tol):
    assert actual.keys() == expected.keys() and actual
    for name in actual:
        torch.testing.assert_close(actual[name], scale * expected[name], **(tol or GRAD_TOL))


def is_zero(grads):
    return all(torch.count_nonzero(g) == 0 for g in grads.values())


@pytest.mark.parametrize("estimator", ["nsr", "psr", "w_reinforce"])
def test_only_the_estimators_samples_receive_gradient(tmp_path, dataset, estimator):
    trainer = make_trainer(tmp_path, dataset, advantage_estimator=estimator, entropy_coef=0.0)
    inputs = crafted_batch(trainer)
    advantages = inputs["advantages"]
    correct_adv, incorrect_adv = DEFINITION[estimator]
    torch.testing.assert_close(advantages, torch.where(REWARDS == 1, correct_adv, incorrect_adv))
    mask = inputs["completion_mask"]
    total_tokens = mask.sum()

    _, full = loss_and_grads(trainer, inputs)
    # the trainer's gradient is the surrogate's at ratio 1 (token mean over the micro-batch)
    assert_grads_close(full, reference_grads(trainer.model, inputs,
                                             surrogate_at_ratio_one(advantages)))
    summed = {n: torch.zeros_like(g) for n, g in full.items()}
    for i in range(len(REWARDS)):
        _, grads = loss_and_grads(trainer, rows(inputs, [i]))
        if advantages[i] == 0:
            assert is_zero(grads), f"sample {i} has advantage 0 but received gradient"
        else:
            assert not is_zero(grads)
            # = A_i * (gradient of -mean_t log pi of sample i): a correct sample under
            # w_reinforce gets lambda times the gradient a unit advantage would give
            unit = reference_grads(trainer.model, rows(inputs, [i]),
                                   surrogate_at_ratio_one(torch.ones(1)))
            assert_grads_close(grads, unit, scale=advantages[i].item())
        for name in summed:
            summed[name] += grads[name] * mask[i].sum() / total_tokens
    assert_grads_close(full, summed)

    # only the samples with non-zero advantage matter: dropping the others from the batch
    # changes the gradient only by the token-count normaliser
    active = [i for i in range(len(REWARDS)) if advantages[i] != 0]
    expected_active = {"nsr": REWARDS == 0, "psr": REWARDS == 1,
                       "w_reinforce": torch.ones_like(REWARDS, dtype=torch.bool)}[estimator]
    assert active == expected_active.nonzero().flatten().tolist()
    _, only_active = loss_and_grads(trainer, rows(inputs, active))
    assert_grads_close(full, only_active, scale=(mask[active].sum() / total_tokens).item())


def test_default_entropy_bonus_is_the_only_gradient_of_correct_samples(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset)  # NSRConfig defaults: nsr, entropy_coef 0.001
    assert trainer.args.entropy_coef == pytest.approx(0.001)
    inputs = crafted_batch(trainer)
    correct = rows(inputs, [0])
    assert correct["advantages"].item() == 0
    _, grads = loss_and_grads(trainer, correct)
    coef = trainer.args.entropy_coef

    def entropy_bonus(logp, entropy, mask):
        return -coef * (entropy * mask).sum() / mask.sum()
    expected = reference_grads(trainer.model, correct, entropy_bonus)
    assert not is_zero(expected)
    assert_grads_close(grads, expected, rtol=1e-3, atol=1e-9)

    _, full = loss_and_grads(trainer, inputs)

    def nsr_with_bonus(logp, entropy, mask):
        return surrogate_at_ratio_one(inputs["advantages"])(logp, entropy, mask) + \
            entropy_bonus(logp, entropy, mask)
    assert_grads_close(full, reference_grads(trainer.model, inputs, nsr_with_bonus),
                       rtol=1e-3, atol=1e-8)


def test_short_nsr_run_trains(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, engine=True, max_steps=2, entropy_coef=0.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    accuracy = [e["accuracy"] for e in logs]
    assert min(accuracy) < 1.0, "no incorrect completion: NSR had nothing to learn from"
    # only the nsr policy term can move the weights here (no entropy bonus, no KL)
    changed = [n for n, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed after two NSR steps"
    for entry, acc in zip(logs, accuracy):
        assert entry["advantages/nonzero_frac"] == pytest.approx(1.0 - acc)


def test_non_binary_rewards_need_a_threshold(tmp_path, dataset):
    trainer = make_trainer(tmp_path / "a", dataset, reward=fraction_reward, engine=True,
                           max_steps=1)
    with pytest.raises(UserError, match="correctness_threshold") as info:
        trainer.train()
    assert "binary rewards" in str(info.value) and "fraction_reward" in str(info.value)
    assert any(entry.name == "training_step" for entry in info.traceback), \
        "the error should stop the training step"

    trainer = make_trainer(tmp_path / "b", dataset, reward=fraction_reward, engine=True,
                           max_steps=1, correctness_threshold=0.5)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 1 and torch.isfinite(torch.tensor(logs[0]["loss"]))


SIGNAL_OPTIONS = {"signal_h_lo": 2, "signal_h_hi": 6, "signal_window": 4}


@pytest.mark.parametrize("estimator", ["nsr", "psr", "w_reinforce"])
def test_coupled_credit_shapes_the_estimators_advantages(tmp_path, dataset, estimator):
    trainer = make_trainer(tmp_path, dataset, advantage_estimator=estimator, credit="coupled",
                           **SIGNAL_OPTIONS)
    inputs = crafted_batch(trainer)
    loss, _ = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    prompt_len = inputs["prompt_ids"].shape[1]
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    response = torch.zeros_like(attention_mask, dtype=torch.bool)
    response[:, prompt_len:] = inputs["completion_mask"].bool()
    signals = reference_token_signals(trainer.model, input_ids, attention_mask, response,
                                      trainer.credit_config.signals)
    gamma = compute_gamma(trainer.credit_config, signals, response)[:, prompt_len:]
    completion = inputs["completion_mask"].bool()
    correct_adv, incorrect_adv = DEFINITION[estimator]
    per_response = torch.where(REWARDS == 1, correct_adv, incorrect_adv)
    expected = gamma * per_response[:, None] * completion
    token_adv = trainer.last_token_advantages
    torch.testing.assert_close(token_adv, expected, atol=1e-5, rtol=0)
    incorrect = REWARDS == 0
    if estimator == "nsr":  # incorrect: -gamma_t on every response token; correct: 0
        torch.testing.assert_close(token_adv[incorrect][completion[incorrect]],
                                   -gamma[incorrect][completion[incorrect]])
        assert torch.count_nonzero(token_adv[~incorrect]) == 0
    marked = (gamma > 1) & completion
    assert marked[incorrect].any() and marked[~incorrect].any(), "no token was amplified"


# strategies that give marked tokens gamma_amp and the rest 1 (methods.md 1.5)
TOKEN_BONUS_STRATEGIES = {"local_chunk", "global_anchor", "coupled", "random", "entropy",
                          "bottom_q"}


@pytest.mark.parametrize("credit", sorted(CREDIT_STRATEGIES))
def test_nsr_composes_with_every_credit_strategy(tmp_path, dataset, credit):
    trainer = make_trainer(tmp_path, dataset, credit=credit, entropy_coef=0.0, **SIGNAL_OPTIONS)
    inputs = crafted_batch(trainer)
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and not is_zero(grads)
    token_adv = trainer.last_token_advantages
    completion = inputs["completion_mask"].bool()
    correct = REWARDS == 1
    assert torch.count_nonzero(token_adv[correct]) == 0
    assert torch.count_nonzero(token_adv[~completion]) == 0
    negative = token_adv[~correct][completion[~correct]]
    gamma_amp = trainer.args.gamma_amp
    if CREDIT_STRATEGIES[credit].signed:  # sign_flip: -1 or +1, never another magnitude
        assert (negative.abs() == 1).all()
        return
    assert (negative < 0).all() and (negative >= -max(gamma_amp, 1.0) - 1e-6).all()
    if credit in TOKEN_BONUS_STRATEGIES:
        assert (negative <= -1 + 1e-6).all()
        assert (negative < -1 - 1e-6).any(), f"{credit} amplified no token"
    # whatever the strategy, correct samples alone give exactly zero gradient
    _, correct_only = loss_and_grads(trainer, rows(inputs, correct.nonzero().flatten().tolist()))
    assert is_zero(correct_only)


def test_estimator_must_be_psr_nsr_or_w_reinforce(tmp_path, dataset):
    with pytest.raises(UserError, match=r"nsr, psr, w_reinforce.*'grpo'.*trainer: grpo"):
        NSRConfig(output_dir=str(tmp_path), **{**COMMON, "advantage_estimator": "grpo"})
    with pytest.raises(UserError, match="did you mean 'nsr'"):
        NSRConfig(output_dir=str(tmp_path), **{**COMMON, "advantage_estimator": "nrs"})
    with pytest.raises(UserError, match="w_reinforce_lambda must be"):
        NSRConfig(output_dir=str(tmp_path), **{**COMMON, "advantage_estimator": "w_reinforce",
                                               "w_reinforce_lambda": -0.5})
    # the trainer checks too (e.g. an args object changed after it was built)
    args = NSRConfig(output_dir=str(tmp_path), **COMMON)
    args.advantage_estimator = "rloo"
    with pytest.raises(UserError, match="nsr, psr, w_reinforce"):
        NSRTrainer(model=build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=2),
                   reward_funcs=[parity_reward], args=args, train_dataset=dataset,
                   processing_class=build_tiny_tokenizer())


def test_paper_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(NSRConfig)}
    assert fields["advantage_estimator"] == "nsr" and fields["w_reinforce_lambda"] == 0.1
    assert fields["loss_type"] == "bnpo"      # token mean over the micro-batch
    assert (fields["epsilon"], fields["beta"], fields["num_iterations"]) == (0.2, 0.0, 1)
    assert fields["scale_rewards"] == "none" and fields["entropy_coef"] == 0.001


@pytest.mark.parametrize("name, estimator", [("nsr", "nsr"), ("w_reinforce", "w_reinforce")])
def test_packaged_configs_load(tmp_path, name, estimator):
    config = load_config(CONFIG_DIR / f"{name}.yaml")
    assert config["trainer"] == "nsr" and config["advantage_estimator"] == estimator
    assert config["model"] == "smollm2" and config["task"] == "chain_sum"
    fields = {f.name for f in dataclasses.fields(NSRConfig)}
    trainer_keys = {k: v for k, v in config.items() if k in fields}
    # the device keys the config leaves out, chosen for this machine as `attnrl train` does
    trainer_keys.update(machine.choose(config)[0])
    args = NSRConfig(**{**trainer_keys, "output_dir": str(tmp_path), "report_to": "none"})
    options = args.estimator_kwargs()
    assert options["correctness_threshold"] == 1.0
    if estimator == "w_reinforce":
        assert options["lambda_"] == 0.1
    # an override switches the estimator; a GRPO estimator is refused for trainer nsr
    assert load_config(CONFIG_DIR / f"{name}.yaml",
                       {"advantage_estimator": "psr"})["advantage_estimator"] == "psr"
    # when the config is read (before anything heavy), and by the trainer config itself
    with pytest.raises(UserError, match="trainer nsr needs advantage_estimator"):
        load_config(CONFIG_DIR / f"{name}.yaml", {"advantage_estimator": "grpo"})
    with pytest.raises(UserError, match="trainer nsr needs advantage_estimator"):
        NSRConfig(**{**trainer_keys, "advantage_estimator": "grpo",
                     "output_dir": str(tmp_path), "report_to": "none"})
