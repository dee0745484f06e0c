"""Checkpoints are whole or absent (trainers/checkpoints.py), and SIGINT / SIGTERM stop a run
with one (trainers/stop.py): an interrupted save is never resumed (it is set aside, in one
line), a signalled run saves at the next step boundary, releases its lock, says how to
resume, and a rerun of the same command continues it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnrl.errors import Interrupted, UserError
from trainers import checkpoints, run_dir
from trainers.job import load_config
from trainers.schema import resolve
from trainers.stop import SignalStop, stopped_line

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
WORKER = Path(__file__).with_name("_resume_worker.py")


def config(out, **overrides):
    return resolve(load_config(TINY, {"output_dir": str(out), "resume": "auto", **overrides}))


def whole_checkpoint(path: Path, step: int, out: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copyfile(out / "config.yaml", path / "config.yaml")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_incomplete_checkpoints_are_skipped_reported_and_set_aside(tmp_path, capsys):
    out = tmp_path / "run"
    resolved = config(out)
    run_dir.write_config(resolved, out, command="attnrl train (test)")
    whole_checkpoint(out / "checkpoint-1", 1, out)
    partial = out / "checkpoint-2"  # killed during a save by an older attnrl: no state file
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a model")
    whole_checkpoint(out / "tmp-checkpoint-3" / "checkpoint-3", 3, out)  # never renamed
    assert run_dir.prepare(resolved) == str(out / "checkpoint-1")
    assert not (out / "incomplete-checkpoint-2").exists()  # prepare writes nothing
    run_dir.start(resolved, command="attnrl train (test)")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert "set aside 2 incomplete checkpoints" in lines[0]
    assert "checkpoint-2 -> incomplete-checkpoint-2, tmp-checkpoint-3 -> " \
           "incomplete-checkpoint-3" in lines[0]
    # moved, not deleted; and never resumed
    assert (out / "incomplete-checkpoint-2" / "model.safetensors").read_bytes() == b"half a model"
    assert run_dir.prepare(resolved) == str(out / "checkpoint-1")
    assert {"incomplete-checkpoint-2", "incomplete-checkpoint-3"} <= \
        {p.name for p in run_dir.run_files(out)}  # --overwrite removes them too
    # a checkpoint named explicitly is refused in one line when its save never finished
    (out / "checkpoint-5").mkdir()
    with pytest.raises(UserError, match=r"checkpoint-5 is incomplete \(no trainer_state.json: "
                                        r"its save was interrupted\); .*checkpoint-1"):
        run_dir.prepare(config(out, resume=str(out / "checkpoint-5")))


class FakeTrainer:
    """What staged_save uses of a transformers Trainer, one process."""

    def __init__(self, out, step, limit):
        self.out, self._staging = str(out), None
        self.state = SimpleNamespace(global_step=step, best_model_checkpoint=None)
        self.args = SimpleNamespace(should_save=True, save_total_limit=limit)
        self.accelerator = SimpleNamespace(wait_for_everyone=lambda: None)

    def _get_output_dir(self, trial):
        return self._staging or self.out

    def save(self, fail=False):
        with checkpoints.staged_save(self, None):
            target = Path(self._get_output_dir(None)) / f"checkpoint-{self.state.global_step}"
            target.mkdir(parents=True)
            (target / "model.safetensors").write_bytes(b"weights")
            if fail:
                raise OSError(28, "No space left on device")
            (target / "trainer_state.json").write_text("{}")


def test_a_failed_save_leaves_the_last_whole_checkpoint_even_with_save_total_limit(
        tmp_path, capsys):
    out = tmp_path / "run"
    run_dir.write_config(config(out), out, command="attnrl train (test)")
    FakeTrainer(out, 1, limit=1).save()
    assert checkpoints.whole(out) == [out / "checkpoint-1"]
    assert (out / "checkpoint-1" / "config.yaml").is_file()  # recorded before the rename
    with pytest.raises(OSError, match="No space left"):
        FakeTrainer(out, 2, limit=1).save(fail=True)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == \
        ["checkpoint-1", "tmp-checkpoint-2"]
    assert run_dir.prepare(config(out)) == str(out / "checkpoint-1")
    # the step saved again: the leftover is set aside, the new one rotates checkpoint-1 out
    FakeTrainer(out, 2, limit=1).save()
    assert "tmp-checkpoint-2 -> incomplete-checkpoint-2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == \
        ["checkpoint-2", "incomplete-checkpoint-2"]


def test_signal_before_training_raises_interrupted_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with SignalStop(), pytest.raises(Interrupted) as err:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert err.value.code == 143 and "before training started; nothing was saved" in \
        err.value.message
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_signal_exits_at_once_releasing_the_lock(tmp_path):
    """A copy of the first signal within repeat_s is ignored; a second one exits 130."""
    out = tmp_path / "run"
    code = ("import os, signal, time\nfrom trainers.run_dir import RunLock\n"
            "from trainers.stop import SignalStop\n"
            f"lock = RunLock({str(out)!r})\nlock.acquire()\n"
            "with SignalStop(release=lock.release) as stop:\n"
            "    stop.training = True\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert stop.received == signal.SIGINT\n"
            "    os.kill(os.getpid(), signal.SIGINT)  # a copy within 1 s (torchrun's)\n"
            "    stop.repeat_s = 0\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            check=False)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1].startswith("second SIGINT: exiting now, without a "
                                                     "checkpoint")
    assert not (out / run_dir.LOCK_NAME).exists()


def test_stopped_line_says_how_to_resume():
    assert stopped_line(15, 3, "out", "auto", False) == \
        "stopped by SIGTERM at step 3: checkpoint-3 saved in out; resume with the same " \
        "command (resume: auto)"
    assert stopped_line(2, 3, "out", "never", False).endswith(
        "resume with the same command plus --resume auto")
    assert stopped_line(2, 3, "out", "auto", True).endswith(
        "plus --resume auto, without --overwrite")


def train_command(model, out, steps):
    return [sys.executable, "-m", "attnrl.cli", "train", "--config", str(TINY), "--model",
            str(model), "--output_dir", str(out), "--max_steps", str(steps), "--resume", "auto"]


def signalled(command, signum):
    """Run `command`, send `signum` once step 1 is logged; (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                proc.send_signal(signum)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + rest, err


def check_stopped(code, stdout, stderr, out, name, steps) -> int:
    """The run stopped at a step boundary with a whole checkpoint, said so in its last line
    and released its lock; returns the step."""
    assert code == {"SIGINT": 130, "SIGTERM": 143}[name], stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name} at step "), stdout[-3000:]
    step = int(last.split("at step ")[1].split(":")[0])
    assert 2 <= step < steps
    assert last == (f"stopped by {name} at step {step}: checkpoint-{step} saved in {out}; "
                    "resume with the same command (resume: auto)")
    assert checkpoints.whole(out) == [out / f"checkpoint-{step}"]
    assert (out / f"checkpoint-{step}" / "config.yaml").is_file()
    assert not (out / "final").exists() and not (out / run_dir.LOCK_NAME).exists()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"{name}: stopping after the step in progress, with a checkpoint" in stderr
    return step


@pytest.mark.slow
def run_to_the_end(command) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_final_weights(a, b) -> None:
    """Bit-identical final models (the stopped-and-resumed run is the uninterrupted one)."""
    from safetensors.torch import load_file

    first, second = (load_file(out / "final" / "model.safetensors") for out in (a, b))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The run the signalled ones must reproduce: 8 steps without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_to_the_end(train_command(tiny_model_dir, out, 8))
    return out


def test_sigterm_stops_with_a_checkpoint_and_the_same_command_resumes(tmp_path,
                                                                      tiny_model_dir,
                                                                      uninterrupted):
    out, steps = tmp_path / "run", 8
    command = train_command(tiny_model_dir, out, steps)
    step = check_stopped(*signalled(command, signal.SIGTERM), out, "SIGTERM", steps)
    resumed = run_to_the_end(command)
    assert f"resuming from {out / f'checkpoint-{step}'}" in resumed.stdout
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
              .splitlines() if "reward" in json.loads(line)]
    assert logged == list(range(1, steps + 1))
    assert_same_final_weights(out, uninterrupted)


@pytest.mark.slow
def test_sigint_stops_with_a_checkpoint_that_resumes_bit_identically(tmp_path, tiny_model_dir,
                                                                     uninterrupted):
    out, steps = tmp_path / "run", 8
    command = train_command(tiny_model_dir, out, steps)
    check_stopped(*signalled(command, signal.SIGINT), out, "SIGINT", steps)
    run_to_the_end(command)
    assert_same_final_weights(out, uninterrupted)


@pytest.mark.slow
def test_kill_during_a_save_leaves_no_checkpoint_to_resume(tmp_path, tiny_model_dir):
    """SIGKILL inside the save of step 2 (model and optimizer written, trainer_state.json
    not yet): no checkpoint-2, and save_total_limit 1 kept checkpoint-1; the rerun sets the
    partial save aside and resumes from checkpoint-1."""
    out = tmp_path / "run"
    job = {"model": str(tiny_model_dir), "output_dir": str(out), "resume": "auto",
           "max_steps": 3, "save_steps": 1, "save_total_limit": 1}

    def run(**env):
        return subprocess.run([sys.executable, str(WORKER), json.dumps(job)], text=True,
                              capture_output=True, timeout=300, check=False,
                              env=dict(os.environ, PYTHONPATH=str(REPO), CONFIG=str(TINY),
                                       **env))

    killed = run(KILL_IN_SAVE="2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoints.whole(out) == [out / "checkpoint-1"]
    assert not (out / "checkpoint-2").exists()
    assert (out / "tmp-checkpoint-2" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tmp-checkpoint-2 -> incomplete-checkpoint-2" in resumed.stdout
    assert f"resuming from {out / 'checkpoint-1'}" in resumed.stdout
    assert checkpoints.whole(out) == [out / "checkpoint-3"]
    assert (out / "incomplete-checkpoint-2" / "checkpoint-2" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path, tiny_model_dir):
    """torchrun, 2 ranks (DeepSpeed ZeRO-2, gloo): SIGTERM reaches rank 1 only; the ranks agree
    at the step end (all_reduce), both write their shards of one checkpoint, rank 0 says how
    to resume. (torchrun reports the workers' exit code 143 as a failure.)"""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "attnrl.cli", "train", "--config", str(TINY),
               "--model", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "8",
               "--resume", "auto", "--deepspeed", "configs/deepspeed/zero2.json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO),
                                               PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:
            if line.startswith("step 1/"):
                os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    line = next((x for x in stdout.splitlines() if x.startswith("stopped by")), "")
    assert line.startswith("stopped by SIGTERM at step "), stderr[-3000:]
    step = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= step < 8
    assert checkpoints.whole(out) == [out / f"checkpoint-{step}"]
    shards = sorted(p.name for p in (out / f"checkpoint-{step}" / f"global_step{step}")
                    .glob("*optim*"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    assert not (out / run_dir.LOCK_NAME).exists() and not checkpoints.incomplete(out)


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with LOCAL_RANK `rank`."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for child in children:
        if f"LOCAL_RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes() \
                .split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker of rank {rank} among {children}")
