"""Two nodes x two processes on this machine through launch/multinode.sh in per-node mode,
started by the DeepSpeed launcher (--no_ssh --node_rank 0/1, what launch/slurm.sbatch
uses) or by `torchrun --nnodes 2 --node_rank 0/1` (--launcher torchrun); gloo on CPU; the tiny job with ZeRO-2, the HF rollout engine, `coupled+random` credit with
a frozen head split and held-out evaluation before, during and after training). On node 1
the global RANK (2, 3) differs from LOCAL_RANK (0, 1), so every rank-dependent path runs
as on a real second node.

Simulated: the two "nodes" are two names of this machine (localhost, 127.0.0.1) and the
network is loopback. Observed, not changed: tests/launch/_rank_probe/sitecustomize.py
(loaded through PYTHONPATH, given to every rank with --env-file) records per rank the
per-completion seeds, the credit generator's next draws before each credit computation,
placement, the head split, held-out writes and a digest of the final weights.

What it would have shown before the fixes of issue 23: the random control drew the same
numbers on all four ranks (its generator was seeded from credit seed and step only)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
PROBE = Path(__file__).with_name("_rank_probe")
TINY = REPO / "configs" / "tiny.yaml"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "NODE_RANK", "CUDA_VISIBLE_DEVICES")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, started", [
    ("deepspeed", "--no_ssh --node_rank {}"),
    ("torchrun", "torch.distributed.run --nnodes 2 --node_rank {}"),
], ids=["deepspeed", "torchrun"])
def test_two_nodes_of_two_processes_every_rank_dependent_path(tmp_path, tiny_model_dir,
                                                                launcher, started):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    report, out = tmp_path / "report", tmp_path / "run"
    env_file = tmp_path / "env"
    env_file.write_text(f"PYTHONPATH={PROBE}\nATTNRL_RANK_PROBE={report}\n")
    common = ["--hostfile", hostfile, "--config", TINY, "--master-addr", "127.0.0.1",
              "--master-port", free_port(), "--ds-config", ZERO2, "--env-file", env_file,
              "--model", tiny_model_dir, "--output_dir", out,
              "--credit", "coupled+random", "--freeze_head_split", "true",
              "--eval_size", 4, "--eval_samples", 1, "--eval_max_tokens", 8,
              "--eval_every", 1, "--launcher", launcher]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"

    def node(rank, **kwargs):
        cmd = ["bash", str(LAUNCH / "multinode.sh"), *map(str, common), "--node-rank",
               str(rank)]
        return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, **kwargs)

    nodes = [node(1), node(0)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-5000:]
    assert started.format(1) in logs[0] and started.format(0) in logs[1]

    facts = {r: json.loads((report / f"rank{r}.json").read_text()) for r in range(4)}
    # placement: node 1 holds global ranks 2 and 3 as local ranks 0 and 1
    for rank, f in facts.items():
        assert f["env_rank"] == f["process_index"] == rank
        assert f["env_local_rank"] == f["local_process_index"] == rank % 2
        assert f["layout"] == [rank, rank % 2, 4]  # what colocated vLLM places by
        # the HF engine's policy copy sits on the rank's own device (GPU: cuda:LOCAL_RANK)
        assert f["engine_device"] == f["device"]
        assert f["device"][0] == "cpu" or f["device"][1] == rank % 2
        assert f["global_step"] == 2
    # per-completion seeds: every row of every rank's generation calls has its own seed
    rows = [s for f in facts.values() for call in f["seeds"] for s in call["rows"]]
    calls = {len(f["seeds"]) for f in facts.values()}
    assert len(calls) == 1 and calls.pop() >= 2  # same number of calls on every rank
    assert len(rows) == len(set(rows)), "a seed is shared by two completions"
    # the random control: every rank draws its own numbers at every credit computation
    for step in range(len(facts[0]["credit_draws"])):
        draws = [tuple(f["credit_draws"][step]) for f in facts.values()]
        assert len(set(draws)) == 4, f"credit computation {step}: ranks share draws"
    # the frozen head split: calibrated once from the union of the ranks, equal on all
    splits = {f["head_split"] for f in facts.values()}
    assert len(splits) == 1 and None not in splits
    # the same final weights on all ranks, and the ones saved
    assert len({f["final_digest"] for f in facts.values()}) == 1
    final = load_file(out / "final" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not (final[k] == initial[k]).all() for k in initial)
    # held-out evaluation: every rank takes part (the sync is collective), rank 0 writes,
    # each file once; one learning-curve point (step 1 < max_steps)
    assert {f["heldout_runs"] for f in facts.values()} == {3}
    assert sorted(facts[0]["heldout_writes"]).count("before.json") == 1
    assert facts[0]["heldout_writes"].count("after.json") == 1
    assert all(not facts[r]["heldout_writes"] for r in (1, 2, 3))
    heldout = out / "heldout"
    assert (heldout / "before.json").is_file() and (heldout / "after.json").is_file()
    curve = [json.loads(line) for line in (heldout / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [1]


def test_multinode_sh_torchrun_per_node_command_and_uneven_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    args = ["bash", str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), "--config",
            str(TINY), "--node-rank", "1", "--launcher", "torchrun", "--dry-run"]
    result = subprocess.run([*args, "--seed", "3"], cwd=REPO, text=True, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert ("-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 2 "
            "--master_addr nodeA --master_port 29500 -m attnrl.cli train") in command
    assert command.endswith(f"--config {TINY} --seed 3")
    # static rendezvous: WORLD_SIZE = nodes x nproc_per_node, so uneven nodes are refused
    hostfile.write_text("nodeA slots=2\nnodeB slots=1\n")
    result = subprocess.run(args, cwd=REPO, text=True, capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 2 and "same slots on every node" in result.stderr
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    result = subprocess.run([*args[:-3], "--launcher", "pdsh", "--dry-run"], cwd=REPO,
                            text=True, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2 and "choose deepspeed (default) or torchrun" in result.stderr
