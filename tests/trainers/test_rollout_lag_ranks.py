"""rollout_lag 1 on 2 processes (torchrun, gloo, CPU) whose per-rank batches split GRPO
groups, with the delayed stand-in for the vLLM server on each rank
(tests/trainers/delayed_engine.py; the real server: tests/attnrl/rollout/test_server.py):
the batch trained at step k came from weight version k-1 on both ranks, in the order
submit(k+1) -> train(k) -> collect(k+1); TRL's importance ratio is exp(log pi_k -
log pi_(k-1)) of independent float32 forwards within 1e-5; at a learning rate too small to
move a float32 weight, lag 1 and lag 0 give identical completions, losses and final weights.

Each run takes 30-60 s on 2 shared cores."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnrl.models import load_model
from tests.trainers.test_deepspeed import TINY, TORCHRUN, launch
from tests.trainers.test_rollout_lag import token_logps
from tests.trainers.test_rollout_ranks import NUM_GENERATIONS, assert_groups_distinct

WORKER = Path(__file__).with_name("_rollout_worker.py")


def run(tiny_model_dir, out: Path, *extra):
    report = out / "report"
    out.mkdir(parents=True, exist_ok=True)
    launch(TORCHRUN + [str(WORKER), str(report), "--config", TINY, "--fake_server", "0.3",
                       "--model", str(tiny_model_dir), "--output_dir", str(out / "run"),
                       "--rollout_engine", "vllm_server", "--rollout_server_url",
                       "http://stand-in", "--num_generations", str(NUM_GENERATIONS),
                       "--per_device_train_batch_size", "2", "--max_steps", "3",
                       "--max_completion_length", "12", "--save_steps", "1000", *extra],
           out / "log.txt", timeout=600)
    read = lambda name: [json.loads((report / f"{name}_rank{r}.json").read_text())
                         for r in range(2)]
    scored = [torch.load(report / f"scored_rank{r}.pt") for r in range(2)]
    return read("rollouts"), read("metrics"), read("events"), scored, report


def test_two_ranks_train_on_the_previous_version_in_order(tiny_model_dir, tmp_path):
    calls, metrics, events, scored, report = run(tiny_model_dir, tmp_path, "--rollout_lag",
                                                 "1")
    assert_groups_distinct(calls, steps=3)
    for rank in range(2):
        assert [c["versions"] for c in calls[rank]] == [[0], [0], [1]], calls[rank]
        kinds = [e[0] for e in events[rank]]
        assert kinds == ["push", "submit", "train"] + ["collect", "push", "submit",
                                                       "train"] * 2, kinds
        lags = [row["rollout/lag"] for row in metrics[rank] if "rollout/lag" in row]
        assert lags == [0.0, 1.0, 1.0], lags
    model = load_model(tiny_model_dir, dtype=torch.float32)
    largest = 0.0
    for rank in range(2):
        for batch in scored[rank][1:]:
            k = batch["step"]
            model.load_state_dict(torch.load(report / f"weights_v{k}.pt"))
            now = token_logps(model, batch)
            model.load_state_dict(torch.load(report / f"weights_v{k - 1}.pt"))
            then = token_logps(model, batch)
            mask = batch["completion_mask"].bool()
            torch.testing.assert_close(batch["importance_sampling_ratio"][mask],
                                       torch.exp(now - then)[mask], atol=1e-5, rtol=0)
            largest = max(largest, (now - then)[mask].abs().max().item())
    assert largest > 1e-3, "the weights barely moved: the check could not see the lag"


@pytest.mark.slow
def test_two_ranks_lag_one_equals_lag_zero_when_weights_stay(tiny_model_dir, tmp_path):
    """learning_rate 1e-30: Adam moves each weight by about 1e-30, below a float32 ulp of
    any weight, so every version is the initial weights and lag cannot change a number."""
    runs = [run(tiny_model_dir, tmp_path / f"lag{lag}", "--rollout_lag", str(lag),
                "--learning_rate", "1e-30", "--vllm_importance_sampling_mode",
                "token_truncate") for lag in (0, 1)]
    (calls0, metrics0, *_), (calls1, metrics1, *_) = runs
    for rank in range(2):
        assert [c["completion_ids"] for c in calls0[rank]] == \
            [c["completion_ids"] for c in calls1[rank]]
        losses = [[row["loss"] for row in m[rank] if "loss" in row] for m in (metrics0,
                                                                              metrics1)]
        assert losses[0] == losses[1] and len(losses[0]) == 3
    assert [c["versions"] for c in calls1[0]] == [[0], [0], [1]]
    finals = [load_file(tmp_path / f"lag{lag}" / "run" / "final" / "model.safetensors")
              for lag in (0, 1)]
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
