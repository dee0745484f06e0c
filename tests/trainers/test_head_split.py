"""freeze_head_split: one split for every rank (the union of their micro-batches), taken
from a training batch, saved in each checkpoint and restored on resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnrl.models import load_model
from attnrl.signals import reference
from trainers.cli import run_job
from trainers.head_split import STATE_FILE
from trainers.job import load_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_head_split_worker.py")
TINY = REPO / "configs" / "tiny.yaml"
LAYERS = [0, 1, 2, 3]  # every layer of the tiny model: 16 heads, 5 local and 5 global
QUANTILE = 0.3
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2"]


def launch(command: list[str], log: Path, timeout: int = 600) -> None:
    """Run `command` from the repository root without inherited launcher variables; fail
    with the log's tail unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"exit code {result.returncode}:\n" + "\n".join(
            log.read_text().splitlines()[-40:]))


def reference_split(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The split of the union of `batches`, from eager attention maps: each head's span
    summed over every response token of every batch, over the number of those tokens."""
    total, tokens = torch.zeros(len(LAYERS), model.config.num_attention_heads,
                                dtype=torch.float64), 0
    for batch in batches:
        response = batch["response_mask"].bool()
        maps = reference.attention_maps(model, batch["input_ids"], batch["attention_mask"],
                                        LAYERS)
        for i, layer in enumerate(LAYERS):
            per_row = reference.head_span(maps[layer], response)        # (B, H) means
            total[i] += (per_row.double() * response.sum(-1, keepdim=True)).sum(0)
        tokens += int(response.sum())
    return reference.split_heads((total / tokens).float(), QUANTILE)


def as_tensors(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(state["local"], dtype=torch.bool),
            torch.tensor(state["global"], dtype=torch.bool))


@pytest.mark.slow
def test_two_ranks_hold_the_split_of_the_union_of_their_data(tiny_model_dir, tmp_path):
    out, report = tmp_path / "run", tmp_path / "report"
    launch(TORCHRUN + [str(WORKER), str(report), "--config", str(TINY),
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--deepspeed", "configs/deepspeed/zero2.json", "--max_steps", "1",
                       "--save_steps", "1", "--credit", "global_anchor",
                       "--freeze_head_split", "true", "--signal_layers", "[0, 1, 2, 3]",
                       "--signal_head_quantile", str(QUANTILE)], tmp_path / "log.txt")
    batches = [load_file(report / f"batch_rank{r}.safetensors") for r in range(2)]
    splits = [as_tensors(json.loads((report / f"split_rank{r}.json").read_text()))
              for r in range(2)]
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    model = load_model(tiny_model_dir)  # the calibration forward ran on the initial weights
    union = reference_split(model, batches)
    for rank, (local, global_) in enumerate(splits):
        assert torch.equal(local, union[0]) and torch.equal(global_, union[1]), rank
    saved = json.loads((out / "checkpoint-1" / STATE_FILE).read_text())
    assert saved["layers"] == LAYERS
    assert all(torch.equal(a, b) for a, b in zip(as_tensors(saved), union))
    # not vacuous: split on its own micro-batch, at least one rank would have chosen other
    # heads (a rank-local calibration fails the equality above on that rank)
    own = [reference_split(model, [b]) for b in batches]
    assert not all(all(torch.equal(a, b) for a, b in zip(o, union)) for o in own)


@pytest.mark.slow
def test_split_comes_from_training_and_is_restored_on_resume(tiny_model_dir, tmp_path):
    base = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
            "credit": "global_anchor", "freeze_head_split": True, "save_steps": 1,
            "num_generations": 4, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "max_steps": 1}
    trainer = run_job(load_config(TINY, base))
    split = trainer.head_split.split
    assert split is not None
    saved = tmp_path / "run" / "checkpoint-1" / STATE_FILE
    assert all(torch.equal(a, b) for a, b in zip(as_tensors(json.loads(saved.read_text())),
                                                 split))
    # an evaluation forward never calibrates the split
    trainer.head_split.split = None
    trainer.evaluate(eval_dataset=trainer.train_dataset.select(range(2)))
    assert trainer.head_split.split is None

    # resume: the checkpoint's split is used, not a fresh calibration (the saved one is
    # replaced by a different valid split, so a recalibration could not match it)
    state = json.loads(saved.read_text())
    state["local"], state["global"] = state["global"], state["local"]
    saved.write_text(json.dumps(state))
    resumed = run_job(load_config(TINY, {**base, "max_steps": 2, "resume": "auto"}),
                      allow_config_change={"max_steps"})
    assert resumed.state.global_step == 2
    restored = resumed.head_split.split
    assert all(torch.equal(a, b) for a, b in zip(restored, as_tensors(state)))
    assert not all(torch.equal(a, b) for a, b in zip(restored, split))
    after = json.loads((tmp_path / "run" / "checkpoint-2" / STATE_FILE).read_text())
    assert after == state
