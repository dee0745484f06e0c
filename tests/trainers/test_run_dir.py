"""One output_dir holds one run: resume only when the recorded config is the new one, refuse
with the names of the keys that differ, never resume the checkpoints of an overwritten run
(trainers/run_dir.py; no training here, see test_run_record.py for real runs)."""

import shutil
from pathlib import Path

import pytest
import yaml

from attnrl.errors import UserError
from trainers import run_dir
from trainers.job import load_config
from trainers.schema import parse_allow_list, resolve

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def config(out, **overrides):
    return resolve(load_config(TINY, {"output_dir": str(out), "resume": "auto", **overrides}))


def fake_run(out, steps=(1, 2), **overrides) -> dict:
    """An output_dir as `attnrl train` leaves it: config.yaml, metrics.jsonl, whole
    checkpoints (each with the config it was made with and its trainer_state.json)."""
    resolved = config(out, **overrides)
    run_dir.write_config(resolved, out, command="attnrl train (test)")
    (Path(out) / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in steps))
    for step in steps:
        (Path(out) / f"checkpoint-{step}").mkdir()
        shutil.copyfile(Path(out) / "config.yaml", Path(out) / f"checkpoint-{step}" / "config.yaml")
        (Path(out) / f"checkpoint-{step}" / "trainer_state.json").write_text(
            f'{{"global_step": {step}}}')
    return resolved


def test_same_config_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_dir.prepare(config(out)) is None  # nothing there yet
    fake_run(out)
    assert run_dir.prepare(config(out)) == str(out / "checkpoint-2")
    # bookkeeping keys may change freely
    assert run_dir.prepare(config(out, logging_steps=5, report_to="none", run_name="x")) == \
        str(out / "checkpoint-2")


@pytest.mark.parametrize("change, names", [
    ({"credit": "global_anchor"}, ["credit: 'coupled' -> 'global_anchor'"]),
    ({"learning_rate": 0.5}, ["learning_rate: 0.001 -> 0.5"]),
    ({"credit": "uniform", "learning_rate": 0.5, "task_kwargs": {"min_terms": 3}},
     ["credit", "learning_rate", "task_kwargs"]),
])
def test_changed_run_is_refused_naming_the_keys(tmp_path, change, names):
    out = tmp_path / "run"
    fake_run(out)
    with pytest.raises(UserError) as err:
        run_dir.prepare(config(out, **change))
    text = str(err.value)
    assert all(name in text for name in names), text
    assert "another output_dir" in text and "--resume never --overwrite" in text
    assert "\n" not in text


def test_max_steps_may_change_only_when_allowed(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    with pytest.raises(UserError, match=r"max_steps: 2 -> 50.*--allow_config_change max_steps"):
        run_dir.prepare(config(out, max_steps=50))
    assert run_dir.prepare(config(out, max_steps=50), allow=parse_allow_list("max_steps")) == \
        str(out / "checkpoint-2")
    # allowing one key does not allow another
    with pytest.raises(UserError, match="credit"):
        run_dir.prepare(config(out, max_steps=50, credit="uniform"), allow={"max_steps"})


def test_allow_list_names_only_keys_that_may_change():
    assert parse_allow_list("max_steps, rollout_engine") == {"max_steps", "rollout_engine"}
    with pytest.raises(UserError, match="learning_rate cannot change when a run resumes"):
        parse_allow_list("max_steps,learning_rate")
    with pytest.raises(UserError, match="unknown key 'max_step'.*max_steps"):
        parse_allow_list("max_step")


def test_never_refuses_a_run_dir_and_overwrite_removes_only_the_run(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds a run .* resume is never; pass --overwrite"):
        run_dir.prepare(config(out, resume="never", credit="uniform"))
    new = config(out, resume="never", credit="uniform")
    before = sorted(p.name for p in out.iterdir())
    assert run_dir.prepare(new, overwrite=True) is None
    # prepare only decides: a start that fails later leaves the old run as it was
    assert sorted(p.name for p in out.iterdir()) == before
    run_dir.start(new, overwrite=True, command="attnrl train (test)")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    # nothing of the old run is left to resume: the new run's config is the recorded one
    assert run_dir.prepare(config(out, credit="uniform")) is None


def test_stale_checkpoint_of_another_run_is_never_resumed(tmp_path):
    """A checkpoint carries the config it was made with: a directory whose config.yaml was
    replaced by a new run's (as a rerun with `resume: never` did before) still refuses."""
    out = tmp_path / "run"
    fake_run(out, steps=(3,))
    run_dir.write_config(config(out, credit="uniform"), out)  # the top-level file: new run
    with pytest.raises(UserError, match=r"credit: 'coupled' -> 'uniform'"):
        run_dir.prepare(config(out, credit="uniform"))


def test_checkpoints_without_a_recorded_config_are_refused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    with pytest.raises(UserError, match="without config.yaml.*cannot be checked"):
        run_dir.prepare(config(out))
    with pytest.raises(UserError, match="has no config.yaml"):
        run_dir.prepare(config(out, resume=str(out / "checkpoint-4")))


def test_explicit_checkpoint_path_is_checked_too(tmp_path):
    fake_run(tmp_path / "a")
    new = config(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    assert run_dir.prepare(new) == str(tmp_path / "a" / "checkpoint-1")
    new = config(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"), seed=3)
    with pytest.raises(UserError, match=r"checkpoint .*checkpoint-1 was made by a different "
                                        r"config \(seed: 0 -> 3\)"):
        run_dir.prepare(new)


def test_recorded_config_is_a_loadable_config_with_versions_and_command(tmp_path):
    resolved = fake_run(tmp_path / "run")
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["recorded"]["command"] == "attnrl train (test)"
    assert {"python", "torch", "transformers", "trl"} <= set(saved["recorded"]["versions"])
    assert saved["task_kwargs"] == resolved["task_kwargs"] and saved["lora"] is None
    assert resolve(load_config(path)) | {"recorded": None} == resolved | {"recorded": None}


def test_run_lock_refuses_a_second_holder_and_releases(tmp_path):
    out = tmp_path / "run"
    first = run_dir.RunLock(out)
    first.acquire()
    assert "pid" in (out / run_dir.LOCK_NAME).read_text()
    with pytest.raises(UserError, match=rf"output_dir {out} is in use by another run \(pid "):
        run_dir.RunLock(out).acquire()
    first.release()
    # the directory was made for the lock and is empty again: removed, as it was before
    assert not out.exists()
    second = run_dir.RunLock(out)
    second.acquire()
    second.release()


def test_run_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_dir.LOCK_NAME).write_text("pid 999999 on elsewhere since 2026-01-01T00:00:00")
    lock = run_dir.RunLock(out)
    lock.acquire()
    assert "taking over the lock left by a run that ended without releasing it (pid 999999" \
        in capsys.readouterr().out
    lock.release()
    assert out.is_dir() and not any(out.iterdir())  # it existed before: kept


def test_second_train_into_a_locked_run_dir_exits_2_fast(tmp_path):
    """A real second `attnrl train` while another process holds the directory (the holder
    is a plain process with the lock: a training run holds it the same way)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from trainers.run_dir import RunLock; "
                                f"RunLock({str(out)!r}).acquire(); print('held', flush=True); "
                                "time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "attnrl.cli", "train", "--output_dir",
                                 str(out), "--eval_size", "0"], capture_output=True, text=True,
                                timeout=120, check=False)
        seconds = time.perf_counter() - start
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"output_dir {out} is in use by another run (pid " in lines[0]
    assert result.stdout == "" and seconds < 10, seconds
    assert sorted(p.name for p in out.iterdir()) == [run_dir.LOCK_NAME]  # nothing written


def test_a_start_that_fails_after_the_model_loaded_leaves_the_directory_as_it_was(
        tmp_path, tiny_model_dir):
    """--overwrite of an existing run, then a failure while the trainer is built (here: PEFT
    finds no module named by lora.target_modules, said in one line naming the model's
    linear layers): the old run is untouched, no lock is left."""
    from trainers.cli import run_job

    out = tmp_path / "run"
    fake_run(out, model=str(tiny_model_dir))
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    new = load_config(TINY, {"output_dir": str(out), "model": str(tiny_model_dir),
                             "lora": {"r": 4, "target_modules": ["no_such_proj"]},
                             "seed": 5})
    with pytest.raises(UserError, match=r"\['no_such_proj'\] match no module of .*q_proj"):
        run_job(new, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    # and a directory that did not exist is not left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="no_such_proj"):
        run_job({**new, "output_dir": str(fresh)})
    assert not fresh.exists()


def test_a_start_that_fails_at_its_first_step_is_not_a_run(tmp_path, tiny_model_dir, capsys):
    """The rollout server does not answer at the first generation, after config.yaml was
    written: what the start wrote is removed (one line says so), and a corrected rerun into
    the same directory (resume: never, no --overwrite) trains."""
    import socket

    from trainers.cli import run_job

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    bad = load_config(TINY, {"output_dir": str(out), "model": str(tiny_model_dir),
                             "rollout_engine": "vllm_server", "max_steps": 1,
                             "rollout_server_url": f"http://127.0.0.1:{port}",
                             "rollout_server_timeout": 1})
    with pytest.raises(UserError, match="no vLLM server answered"):
        run_job(bad)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "the start failed before its first step" in capsys.readouterr().err
    good = load_config(TINY, {"output_dir": str(out), "model": str(tiny_model_dir),
                              "max_steps": 1})
    run_job(good)
    assert (out / "final").is_dir() and (out / "notes.txt").is_file()
