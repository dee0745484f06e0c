"""rollout_lag 1 in one process, with a delayed stand-in for the server engine
(tests/trainers/delayed_engine.py): the batch trained at step k came from weight version
k-1, the events run submit(k+1) -> train(k) -> collect(k+1), at learning rate 0 lag 1 is lag
0 exactly, TRL's ratio is exp(log pi_k - log pi_(k-1)) of independent forwards, gamma comes
from the current weights, a resume regenerates the batch in flight from its seeds, and the
config refuses what lag 1 cannot run with. Two ranks: tests/trainers/test_rollout_lag_ranks.py."""

import copy

import pytest
import torch
from datasets import Dataset

from attnrl.credit import compute_gamma, shape_advantages
from attnrl.errors import UserError
from attnrl.models import build_tiny_model, build_tiny_tokenizer
from attnrl.signals.reference import reference_token_signals
from tests.trainers.delayed_engine import DelayedServerEngine
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer
from trainers.rollout_lag import Lookahead

COMMON = {"per_device_train_batch_size": 4, "num_generations": 4,
          "max_completion_length": 10, "report_to": "none", "use_cpu": True,
          "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-2,
          "lr_scheduler_type": "constant", "seed": 0, "temperature": 1.0, "bf16": False,
          "rollout_engine": "vllm_server", "rollout_server_url": "http://stand-in"}


def length_reward(prompts, completions, **_):
    return [float(len(c) % 5) for c in completions]


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"Question: what is {a} + {b}?"}
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]])


def peaked_model(seed=0):
    """Peaked attention, so credit rankings are far from float-noise ties."""
    model = build_tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=4, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.12)
    return model


class Recording(AttnGRPOTrainer):
    """Records, per scored batch, its tensors and the weights that score it, and, per loss
    call, the advantages before and after the credit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored, self.losses = [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.scored.append({"step": self.state.global_step,
                            "versions": self.last_rollout_versions,
                            "weights": copy.deepcopy(self.model.state_dict()),
                            **{k: v.clone() for k, v in output.items()
                               if isinstance(v, torch.Tensor)}})
        self.engine.events.append(("train", self.state.global_step))
        return output

    def _compute_loss(self, model, inputs):
        outcome = inputs["advantages"].clone()
        loss = super()._compute_loss(model, inputs)
        self.losses.append({"step": self.state.global_step, "outcome": outcome,
                            "token": self.last_token_advantages.detach().clone(),
                            "inputs": {k: v.clone() for k, v in inputs.items()
                                       if isinstance(v, torch.Tensor)}})
        return loss


def trainer_for(tmp_path, dataset, model, delay=0.05, **overrides):
    args = AttnGRPOConfig(output_dir=str(tmp_path), **{**COMMON, **overrides})
    tokenizer = build_tiny_tokenizer()
    engine = DelayedServerEngine(copy.deepcopy(model).eval(), tokenizer, delay=delay)
    return Recording(model=model, reward_funcs=[length_reward], args=args,
                     train_dataset=dataset, processing_class=tokenizer, rollout_engine=engine)


def test_step_k_trains_on_version_k_minus_1_in_order(tmp_path, dataset):
    trainer = trainer_for(tmp_path, dataset, peaked_model(), rollout_lag=1, max_steps=4)
    trainer.train()
    assert [s["versions"] for s in trainer.scored] == [[0], [0], [1], [2]]
    lags = [row["rollout/lag"] for row in trainer.state.log_history if "rollout/lag" in row]
    assert lags == [0.0, 1.0, 1.0, 1.0]
    kinds = [e[0] for e in trainer.engine.events]
    # boundary 0: push v0, submit(1), train(0); boundary k: collect(k), push vk, submit(k+1),
    # train(k); the batch submitted at boundary 3 is waited for and dropped at the end
    assert kinds == ["push", "submit", "train"] + \
        ["collect", "push", "submit", "train"] * 3, kinds
    submits = [e for e in trainer.engine.events if e[0] == "submit"]
    assert [v for _, v, _ in submits] == [0, 1, 2, 3]
    assert not trainer.engine.in_flight


@pytest.mark.parametrize("schedule, versions", [
    ({}, [[0], [0], [1]]),
    # a batch trains 2 steps: the next one comes from the weights of the boundary before
    ({"num_iterations": 2}, [[0], [0]]),
    ({"steps_per_generation": 2}, [[0], [0]]),           # 2 steps per generation batch
    ({"gradient_accumulation_steps": 2}, [[0], [0], [1]]),
])
def test_learning_rate_zero_lag_one_equals_lag_zero(tmp_path, dataset, schedule, versions):
    """Same prompts, seeds, completions, losses and weights as lag 0 when the weights do not
    move, whatever the generation schedule (the next batch is read the right distance
    ahead and seeded for the step it trains at)."""
    runs = {}
    for lag in (0, 1):
        trainer = trainer_for(tmp_path / str(lag), dataset, peaked_model(), rollout_lag=lag,
                              max_steps=3, learning_rate=0.0,
                              vllm_importance_sampling_mode="token_truncate", **schedule)
        trainer.train()
        runs[lag] = trainer
    losses = [[row["loss"] for row in t.state.log_history if "loss" in row] for t in
              runs.values()]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert len(runs[0].scored) == len(runs[1].scored) == len(versions)
    for a, b in zip(runs[0].scored, runs[1].scored):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.equal(a["prompt_ids"], b["prompt_ids"])
    state0, state1 = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(state0[k], state1[k]) for k in state0)
    assert [s["versions"] for s in runs[1].scored] == versions


def token_logps(model, batch) -> torch.Tensor:
    """log pi(completion token | prefix) of a plain float32 forward, (B, C)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    width = batch["prompt_ids"].shape[1]
    logps = torch.log_softmax(logits[:, width - 1:-1], -1)
    return logps.gather(-1, batch["completion_ids"][..., None])[..., 0]


def test_importance_ratio_is_the_lag_of_independent_forwards(tmp_path, dataset):
    trainer = trainer_for(tmp_path, dataset, peaked_model(), rollout_lag=1, max_steps=4)
    assert trainer.args.vllm_importance_sampling_mode == "token_truncate"  # lag's default
    trainer.train()
    model = peaked_model()
    largest = 0.0
    for previous, batch in zip(trainer.scored, trainer.scored[1:]):
        assert batch["versions"] == [batch["step"] - 1]
        model.load_state_dict(batch["weights"])
        now = token_logps(model, batch)
        model.load_state_dict(previous["weights"])  # the weights that generated the batch
        then = token_logps(model, batch)
        mask = batch["completion_mask"].bool()
        expected = torch.exp(now - then)[mask]
        ratio = batch["importance_sampling_ratio"][mask]
        assert expected.max() < trainer.args.vllm_importance_sampling_clip_max
        torch.testing.assert_close(ratio, expected, atol=1e-5, rtol=0)
        largest = max(largest, (now - then)[mask].abs().max().item())
    assert largest > 1e-3, "the weights barely moved: the check could not see the lag"


def test_gamma_comes_from_the_current_weights(tmp_path, dataset):
    trainer = trainer_for(tmp_path, dataset, peaked_model(), rollout_lag=1, max_steps=3,
                          credit="coupled", signal_h_lo=2, signal_h_hi=6, signal_window=4)
    trainer.train()
    weights = {s["step"]: s["weights"] for s in trainer.scored}
    model, config = peaked_model(), trainer.credit_config

    def reference(inputs, outcome, state):
        """Token advantages of the credit computed from full eager maps under `state`."""
        width = inputs["prompt_ids"].shape[1]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        response = torch.zeros_like(mask, dtype=torch.bool)
        response[:, width:] = inputs["completion_mask"].bool()
        model.load_state_dict(state)
        signals = reference_token_signals(model, ids, mask, response, config.signals)
        gamma = compute_gamma(config, signals, response)
        assert (gamma[response] != 1).any(), "no token credited: the check would be vacuous"
        return shape_advantages(config, outcome, gamma, response)[:, width:]

    for call in trainer.losses:
        step = call["step"]
        torch.testing.assert_close(call["token"], reference(call["inputs"], call["outcome"],
                                                            weights[step]), atol=1e-5, rtol=0)
        if step:  # the weights that generated the batch would give other credit
            stale = reference(call["inputs"], call["outcome"], weights[step - 1])
            assert (call["token"] - stale).abs().max() > 1e-2


def test_resume_regenerates_the_batch_in_flight_from_its_seeds(tmp_path, dataset):
    model = peaked_model()
    whole = trainer_for(tmp_path / "whole", dataset, copy.deepcopy(model), rollout_lag=1,
                        max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    in_flight = [e[2] for e in whole.engine.events if e[0] == "submit"][1]  # for step 2
    resumed = trainer_for(tmp_path / "whole", dataset, copy.deepcopy(model), rollout_lag=1,
                          max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    version, seeds = resumed.engine.generated[0]
    assert version == 2 and seeds == in_flight
    assert [s["versions"] for s in resumed.scored] == [[2], [2]]
    lags = [row["rollout/lag"] for row in resumed.state.log_history
            if "rollout/lag" in row and row["step"] > 2]
    assert lags == [0.0, 1.0]  # the regenerated batch came from version 2, then lag 1


def test_lookahead_reads_ahead_and_keeps_what_it_handed_out():
    ahead = Lookahead(iter([[i] for i in range(7)]), keep=3)
    first = next(ahead)
    assert ahead.position(first) == 0 and ahead.at(4) == [4] and ahead.at(0) == [0]
    assert [next(ahead) for _ in range(3)] == [[1], [2], [3]]
    assert ahead.position(first) is None and ahead.at(0) is None  # past `keep`
    assert ahead.at(6) == [6] and ahead.at(7) is None
    assert list(ahead) == [[4], [5], [6]]


@pytest.mark.parametrize("overrides, words", [
    ({"rollout_engine": "hf"}, "needs rollout_engine vllm_server, not hf"),
    ({"vllm_importance_sampling_correction": False}, "keep vllm_importance_sampling_correction"),
    ({"vllm_importance_sampling_mode": "sequence_mask"}, "token-level"),
])
def test_config_refuses_what_lag_one_cannot_run_with(tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        AttnGRPOConfig(output_dir=str(tmp_path), **{**COMMON, "rollout_lag": 1, **overrides})
