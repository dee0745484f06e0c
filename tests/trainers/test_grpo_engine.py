"""The GRPO trainer's own transformers rollout engine and its logging of credit fallbacks:
the policy copy is in the policy's dtype on the trainer's device, and a micro-batch that
trains without credit (no response tokens) says so in the metrics and the log."""

import logging

import pytest
import torch
from datasets import Dataset

from attnrl.models import load_model
from tests.trainers.test_grpo import fixed_batch, loss_and_grads, make_trainer
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"Question: what is {a} + {b}?"}
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])


def test_hf_policy_copy_has_the_policys_dtype_and_device(tiny_model_dir, tmp_path, dataset):
    """A bfloat16 policy gets a bfloat16 copy on accelerator.device (cuda:LOCAL_RANK on GPU
    nodes; this CPU machine can only show the device it has), not float32 on CPU."""
    model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, model=model,
                           credit="uniform")
    engine = trainer._make_engine()
    params = list(engine.model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device for p in params} == {trainer.accelerator.device}


def test_gamma_one_fallback_is_logged(tmp_path, dataset, caplog):
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset, credit="coupled",
                           mask_truncated_completions=True)
    inputs = fixed_batch(trainer)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    with caplog.at_level(logging.WARNING, logger="trainers.grpo"):
        loss_and_grads(trainer, inputs)
        loss_and_grads(trainer, fixed_batch(trainer))
    assert trainer._metrics["train"]["credit/gamma_one_fallback"] == [1.0, 0.0]
    warnings = [r.getMessage() for r in caplog.records if "gamma = 1" in r.getMessage()]
    assert len(warnings) == 1 and "rank 0" in warnings[0]
    assert "no response tokens" in warnings[0]
