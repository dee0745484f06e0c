"""launch/*.sh: real 2-process DeepSpeed runs of the tiny job on CPU (one node; two 'nodes'
on this machine), and each script's input checks and resolved commands."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainers.job import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TINY = REPO / "configs" / "tiny.yaml"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
HAS_GPU = shutil.which("nvidia-smi") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def script(name, *args, env=None, timeout=60, background=False):
    cmd = ["bash", str(LAUNCH / name), *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, check=False, cwd=REPO, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def check_two_rank_run(output_dir: Path, model_dir: Path):
    """The job ran as 2 DeepSpeed ZeRO ranks for max_steps steps and changed the weights."""
    config = load_config(TINY)
    steps = config["max_steps"]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(trained) == list(range(1, steps + 1))
    # one step consumes world_size x (per-rank prompts) prompts of the dataset
    per_rank_prompts = config["per_device_train_batch_size"] // config["num_generations"]
    assert trained[1]["epoch"] == pytest.approx(2 * per_rank_prompts / config["task_size"])
    shards = sorted(p.name for p in (output_dir / "checkpoint-1" / "global_step1").iterdir()
                    if p.name.endswith("optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    initial = load_file(model_dir / "model.safetensors")
    final = load_file(output_dir / "final" / "model.safetensors")
    assert set(final) <= set(initial) | {"lm_head.weight"}
    assert max((final[k] - initial[k]).abs().max().item() for k in final if k in initial) > 0


# ---------------------------------------------------------------- real runs
@pytest.mark.slow
def test_train_sh_runs_tiny_job_with_two_processes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = script("train.sh", "--config", TINY, "--gpus", 2, "--ds-config", ZERO2,
                    "--master-port", free_port(), "--model", tiny_model_dir,
                    "--output_dir", out, "--save_steps", 1, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "deepspeed.launcher.runner" in command and "--num_gpus 2" in command
    check_two_rank_run(out, tiny_model_dir)


@pytest.mark.slow
def test_multinode_sh_runs_two_nodes_on_localhost(tmp_path, tiny_model_dir):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two names for this machine = two nodes\nlocalhost slots=1\n"
                        "127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    common = ["--hostfile", hostfile, "--config", TINY, "--master-addr", "127.0.0.1",
              "--master-port", free_port(), "--ds-config", ZERO2, "--model", tiny_model_dir,
              "--output_dir", out, "--save_steps", 1]
    node1 = script("multinode.sh", *common, "--node-rank", 1, background=True)
    try:
        node0 = script("multinode.sh", *common, "--node-rank", 0, timeout=900)
        log1, _ = node1.communicate(timeout=300)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node0.returncode == 0, (node0.stdout + node0.stderr)[-4000:]
    assert node1.returncode == 0, log1[-4000:]
    assert "--no_ssh --node_rank 0" in node0.stdout and "--no_ssh --node_rank 1" in log1
    check_two_rank_run(out, tiny_model_dir)


# ---------------------------------------------------------------- train.sh checks
def test_train_sh_missing_config():
    result = script("train.sh", "--config", "configs/nope.yaml")
    assert result.returncode == 2 and "configs/nope.yaml" in result.stderr
    result = script("train.sh")
    assert result.returncode == 2 and "--config" in result.stderr


def test_train_sh_dry_run_resolves_command():
    result = script("train.sh", "--config", TINY, "--gpus", 1, "--ds-config", ZERO2,
                    "--dry-run", "--max_steps", 5, "--credit", "uniform",
                    "--master-port", free_port())
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert f"--config {TINY}" in command and f"--deepspeed {ZERO2}" in command
    assert command.endswith("--max_steps 5 --credit uniform")
    assert "--module attnrl.cli train" in command
    if not HAS_GPU:
        assert "DS_ACCELERATOR=cpu" in command and "no GPU found" in result.stdout


def test_train_sh_rejects_bad_inputs(tmp_path):
    result = script("train.sh", "--config", TINY, "--ds-config", TINY, "--dry-run")
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    result = script("train.sh", "--config", TINY, "--gpus", "two", "--dry-run")
    assert result.returncode == 2 and "--gpus" in result.stderr
    for typo, meant in (("--gpu", "--gpus N"), ("--num_gpus", "--gpus N"),
                        ("--ds_config", "--ds-config FILE")):
        result = script("train.sh", "--config", TINY, typo, 2, "--dry-run")
        assert result.returncode == 2 and f"did you mean {meant}" in result.stderr, \
            result.stderr
    if HAS_GPU:
        result = script("train.sh", "--config", TINY, "--gpus", 4096, "--dry-run")
        assert result.returncode == 2 and "usable GPU" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = script("train.sh", "--config", TINY, "--master-port", port, "--dry-run")
    assert result.returncode == 2 and f"port {port} is in use" in result.stderr


# ---------------------------------------------------------------- multinode.sh checks
@pytest.mark.parametrize("text, message", [
    ("localhost slots=1\nlocalhost slots=1\n", "listed twice"),
    ("localhost 2\n", "is not 'HOSTNAME slots=N'"),
    ("# nothing\n", "lists no hosts"),
])
def test_multinode_sh_rejects_bad_hostfiles(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY,
                    "--node-rank", 0, "--dry-run")
    assert result.returncode == 2 and message in result.stderr


def test_multinode_sh_checks_rank_hostfile_and_backend(tmp_path):
    result = script("multinode.sh", "--hostfile", tmp_path / "missing", "--config", TINY)
    assert result.returncode == 2 and "hostfile" in result.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY,
                    "--node-rank", 2, "--dry-run")
    assert result.returncode == 2 and "ranks 0..1" in result.stderr
    if shutil.which("pdsh") is None:
        result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--dry-run")
        assert result.returncode == 2 and "pdsh" in result.stderr and "--node-rank" in result.stderr


def test_multinode_sh_dry_run_per_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    env_file = tmp_path / "node.env"
    env_file.write_text("# per-node settings\nNCCL_SOCKET_IFNAME=eth0\n"
                        "WANDB_API_KEY=secret-abc123\n")
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--node-rank", 1,
                    "--master-port", 29777, "--env-file", env_file, "--dry-run", "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert "2 node(s), 4 process(es) in all; master nodeA:29777" in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    # the env file's keys are shown, its values never (they land in job logs)
    assert "NCCL_SOCKET_IFNAME=<hidden>" in command and "WANDB_API_KEY=<hidden>" in command
    assert "secret-abc123" not in result.stdout + result.stderr and "eth0" not in command
    assert f"--hostfile {hostfile} --no_ssh --node_rank 1 --master_addr nodeA" in command
    assert command.endswith(f"--config {TINY} --seed 3")
    env_file.write_text("not an assignment\n")
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--node-rank", 1,
                    "--env-file", env_file, "--dry-run")
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


def fake_gpus(tmp_path, count):
    """A PATH with an `nvidia-smi -L` listing `count` GPUs. This machine has none; the
    scripts only count the lines, so a stand-in is the one way to reach their GPU branch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: stand-in (UUID: GPU-{i})'\n" for i in range(count))
    smi.write_text("#!/bin/sh\n" + lines)
    smi.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_multinode_sh_per_node_respects_cuda_visible_devices(tmp_path):
    """SLURM (or the user) gives a node GPUs 4,5: DeepSpeed is told so (--include), instead
    of numbering that node's GPUs 0,1; a count that does not match the slots is refused."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    path = fake_gpus(tmp_path, 8)
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--node-rank", 1,
                    "--dry-run", env={"PATH": path, "CUDA_VISIBLE_DEVICES": "4,5"})
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "--no_ssh --node_rank 1 --include nodeB:4\\,5" in command  # printf %q form
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--node-rank", 1,
                    "--dry-run", env={"PATH": path, "CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert result.returncode == 2 and "slots=2; make them equal" in result.stderr
    result = script("multinode.sh", "--hostfile", hostfile, "--config", TINY, "--node-rank", 1,
                    "--dry-run", env={"PATH": path})
    assert result.returncode == 0 and "--include" not in result.stdout


# ---------------------------------------------------------------- slurm.sbatch checks
def test_slurm_sbatch_outside_slurm_fails_clearly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), str(TINY)], check=False,
                            cwd=REPO,
                            env=env, text=True, capture_output=True, timeout=60)
    assert result.returncode == 2 and "not inside a SLURM allocation" in result.stderr


def test_slurm_sbatch_resolves_nodes_and_hostfile(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c",
           "SLURM_GPUS_ON_NODE": "8", "HOSTFILE_DIR": str(tmp_path), "DRY_RUN": "1"}
    if shutil.which("scontrol"):
        pytest.skip("scontrol present: the node list would be expanded by the real cluster")
    result = script("slurm.sbatch", TINY, "--max_steps", 7, env=env)
    assert result.returncode == 0, result.stderr
    hostfile = tmp_path / "hostfile-4242"
    assert hostfile.read_text().split("\n")[:3] == ["gpu-a slots=8", "gpu-b slots=8",
                                                    "gpu-c slots=8"]
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "srun --nodes 3 --ntasks-per-node 1" in command
    assert "--cpus-per-task" not in command  # none given by the allocation: srun's own
    # srun (Slurm >= 22.05) does not inherit sbatch's --cpus-per-task: passed explicitly
    cpus = script("slurm.sbatch", TINY, env={**env, "SLURM_CPUS_PER_TASK": "64"})
    line = next(x for x in cpus.stdout.splitlines() if x.startswith("+ "))
    assert "srun --nodes 3 --ntasks-per-node 1 --cpus-per-task 64 --kill-on-bad-exit=1" in line
    assert "launch/multinode.sh" in command and "--node-rank\\ \\$SLURM_NODEID" in command
    assert "--master-addr\\ gpu-a" in command and "--max_steps\\ 7" in command
    result = script("slurm.sbatch", env=env)
    assert result.returncode == 2 and "no config given" in result.stderr


# ---------------------------------------------------------------- vllm_server.sh checks
def test_vllm_server_sh_checks_inputs(tmp_path, tiny_model_dir):
    result = script("vllm_server.sh", "--model", tmp_path)
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = script("vllm_server.sh")
    assert result.returncode == 2 and "--model" in result.stderr
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--serve-fast")
    assert result.returncode == 2 and "unknown option '--serve-fast'" in result.stderr
    if not HAS_GPU:
        result = script("vllm_server.sh", "--model", tiny_model_dir, "--gpus", "0,1",
                        env={"ATTNRL_ROLLOUT_API_KEY": "k"})
        assert result.returncode == 2 and "no GPU on this machine" in result.stderr


def test_vllm_server_sh_dry_run(tiny_model_dir):
    port = free_port()
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--host", "127.0.0.1",
                    "--port", port, "--max-model-len", 1024, "--dry-run", "--",
                    "--max-num-seqs", 64, env={"ATTNRL_ROLLOUT_API_KEY": "k"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"rollout_server_url: http://127.0.0.1:{port}" in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "VLLM_SERVER_DEV_MODE=1" in command
    assert f"--model {tiny_model_dir} --host 127.0.0.1 --port {port}" in command
    assert command.endswith("--max-num-seqs 64")
    if not HAS_GPU:
        assert "--kv-cache-memory-bytes 1073741824 --no-enable-chunked-prefill" in command
    # the trainer's dtype, not vLLM's auto (which loads a float32 checkpoint as bf16)
    assert "--dtype float32" in command and "the trainer's default dtype" in result.stdout


def test_vllm_server_sh_takes_the_dtype_of_the_training_config(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndtype: bfloat16\n")
    key = {"ATTNRL_ROLLOUT_API_KEY": "k"}
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                    "--config", config, "--dry-run", env=key, timeout=120)
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "--dtype bfloat16" in command and f"(the trainer's, from {config})" in result.stdout
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                    "--config", config, "--dtype", "auto", "--dry-run", env=key, timeout=120)
    assert "--dtype auto" in result.stdout  # an explicit --dtype wins


def test_vllm_server_sh_loopback_by_default_with_guard_and_secret(tiny_model_dir, tmp_path):
    """Without --host the server listens on 127.0.0.1 behind attnrl's guard, with the
    weights directory fixed at start-up; the secret is required and never printed;
    --insecure is gone."""
    port = free_port()
    secret = "s3cret-not-to-print"
    key = {"ATTNRL_ROLLOUT_API_KEY": secret}
    weights = tmp_path / "weights"
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", port,
                    "--weights-dir", weights, "--dry-run", env=key, timeout=120)
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert f"--host 127.0.0.1 --port {port}" in command
    assert "--middleware attnrl.rollout.server_guard.ServerGuard" in command
    assert f"ATTNRL_ROLLOUT_WEIGHTS_DIR={weights.resolve()}" in command and weights.is_dir()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=0" in command
    assert "API key: required" in result.stdout
    assert secret not in result.stdout + result.stderr
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--host", "0.0.0.0",
                    "--port", port, "--insecure", "--dry-run", env={"ATTNRL_ROLLOUT_API_KEY": ""})
    assert result.returncode == 2 and "ATTNRL_ROLLOUT_API_KEY" in result.stderr


def test_vllm_server_sh_always_requires_a_key(tiny_model_dir):
    """No secret, no server: on loopback too (any local user could reload its weights)."""
    for extra in ([], ["--host", "127.0.0.1"], ["--", "--host", "0.0.0.0"]):
        result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                        *extra, "--dry-run", env={"ATTNRL_ROLLOUT_API_KEY": ""})
        assert result.returncode == 2, (extra, result.stdout)
        assert "ATTNRL_ROLLOUT_API_KEY" in result.stderr and "+ " not in result.stdout


@pytest.mark.slow
def test_vllm_server_sh_reads_forwarded_args_with_vllms_parser(tiny_model_dir, tmp_path):
    """What follows `--` is parsed by vLLM's own parser, the last value winning as in vLLM:
    a forwarded --logprobs-mode or --model is refused, a forwarded --host / --port is the
    one checked and reported."""
    key = {"ATTNRL_ROLLOUT_API_KEY": "k-9f2"}
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                    "--dry-run", "--", "--logprobs-mode", "raw_logprobs", env=key, timeout=120)
    assert result.returncode == 2 and "--logprobs-mode raw_logprobs" in result.stderr
    assert "processed_logprobs" in result.stderr
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                    "--dry-run", "--", "--model", tmp_path, env=key, timeout=120)
    assert result.returncode == 2 and "--model" in result.stderr
    port = free_port()
    result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                    "--dry-run", "--", "--host", "0.0.0.0", "--port", port, env=key, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "listens on 0.0.0.0 (every interface)" in result.stdout
    assert f":{port}" in result.stdout.split("rollout_server_url:")[1].splitlines()[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = script("vllm_server.sh", "--model", tiny_model_dir, "--port", free_port(),
                        "--dry-run", "--", "--port", taken, env=key, timeout=120)
    assert result.returncode == 2 and f"port {taken}" in result.stderr
