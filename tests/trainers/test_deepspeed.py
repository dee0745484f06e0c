"""DeepSpeed runs of the tiny GRPO job on CPU, in real processes joined by gloo: ZeRO-2 and
ZeRO-3 with 2 processes started by torchrun, ZeRO-3 with CPU offload in one process with
no launcher. Each checks that training finished on every rank, that the saved model moved
away from the initial weights, and (through the worker) that the rollout engine of every
rank holds exactly the trained weights after a sync (the ZeRO-3 gather).

None of these compiles a DeepSpeed op (AttnGRPOConfig keeps the CPU comm backend from
building its shared-memory op); a run takes 30-60 s on 2 shared cores, mostly imports.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnrl.errors import UserError
from trainers.job import load_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ds_worker.py")
TINY = "configs/tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2"]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

def launch(command: list[str], log: Path, timeout: int = 420) -> float:
    """Run `command` from the repository root; fail with the log's tail unless it exits 0.
    Returns the wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"exit code {result.returncode} after {seconds:.0f} s:\n{tail}")
    print(f"{' '.join(command[:6])} ...: {seconds:.1f} s")
    return seconds


def assert_trained(initial_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The final model was saved, every tensor moved, and both logged steps had reward
    spread (so the moves come from the policy gradient). Returns the final weights."""
    initial = load_file(initial_dir / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == initial.keys()
    unchanged = [k for k in initial if torch.equal(initial[k], final[k])]
    assert not unchanged, f"tensors equal to the initial weights: {unchanged}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("reward") is not None]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps
    assert all(r["reward_std"] > 0 for r in steps)
    return final


def read_worker_report(report: Path, world_size: int) -> list[dict]:
    """Every rank's facts; its engine weights equal on all ranks."""
    facts = [json.loads((report / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [f["rank"] for f in facts] == list(range(world_size))
    for f in facts:
        assert f["world_size"] == world_size and f["engine"] == "DeepSpeedEngine"
        assert f["backend"] == "gloo" and not f["shm_comm_op_built"]
    return facts


def assert_engine_holds(report: Path, world_size: int, final: dict[str, torch.Tensor]):
    for rank in range(world_size):
        engine = load_file(report / f"engine_rank{rank}.safetensors")
        assert engine.keys() == final.keys()
        for name, weight in final.items():  # exact: both gather the same fp32 shards
            assert torch.equal(engine[name], weight), f"rank {rank}: engine {name}"


@pytest.mark.slow
def test_zero2_two_processes_torchrun_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    launch(TORCHRUN + ["-m", "attnrl.cli", "train", "--config", TINY,
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--deepspeed", "configs/deepspeed/zero2.json"], tmp_path / "log.txt")
    assert_trained(Path(tiny_model_dir), out)
    # the DeepSpeed checkpoint holds one optimizer-state partition per rank (ZeRO-2)
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").glob("*optim*"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards


@pytest.mark.slow
def test_zero3_two_processes_engine_gets_gathered_weights(tiny_model_dir, tmp_path):
    out, report = tmp_path / "run", tmp_path / "report"
    launch(TORCHRUN + [str(WORKER), str(report), "--config", TINY,
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--deepspeed", "configs/deepspeed/zero3.json"], tmp_path / "log.txt")
    final = assert_trained(Path(tiny_model_dir), out)
    facts = read_worker_report(report, 2)
    for f in facts:
        assert f["zero_stage"] == 3 and f["global_step"] == 2
        # each rank holds about half of the parameters (small ones stay whole)
        assert f["local_numel"] < 0.6 * f["full_numel"], f
    assert_engine_holds(report, 2, final)


@pytest.mark.slow
def test_zero3_cpu_offload_one_process_without_launcher(tiny_model_dir, tmp_path):
    out, report = tmp_path / "run", tmp_path / "report"
    launch([sys.executable, str(WORKER), str(report), "--config", TINY,
            "--model", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "1",
            "--deepspeed", "configs/deepspeed/zero3_offload.json"], tmp_path / "log.txt")
    final = assert_trained(Path(tiny_model_dir), out)
    (facts,) = read_worker_report(report, 1)
    assert facts["zero_stage"] == 3 and facts["global_step"] == 1
    assert facts["offload_optimizer"] == "cpu" and facts["offload_param"] == "cpu"
    assert facts["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert_engine_holds(report, 1, final)


def test_deepspeed_key_takes_a_shipped_name_or_a_file_and_rejects_others(tiny_model_dir):
    base = {"model": str(tiny_model_dir)}
    config = load_config(REPO / TINY, {**base, "deepspeed": "zero3_offload"})
    assert Path(config["deepspeed"]) == REPO / "configs" / "deepspeed" / "zero3_offload.json"
    stage = json.loads(Path(config["deepspeed"]).read_text())["zero_optimization"]
    assert stage["stage"] == 3 and stage["offload_param"]["device"] == "cpu"
    zero2 = REPO / "configs" / "deepspeed" / "zero2.json"
    config = load_config(REPO / TINY, {**base, "deepspeed": str(zero2)})
    assert json.loads(Path(config["deepspeed"]).read_text())["zero_optimization"]["stage"] == 2
    with pytest.raises(UserError, match=r"deepspeed config 'zero4' not found.*did you mean "
                                        r"'zero\d'.*zero2, zero3, zero3_offload"):
        load_config(REPO / TINY, {**base, "deepspeed": "zero4"})
