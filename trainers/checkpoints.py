"""Checkpoints that are whole or absent (imports nothing heavy).

    OUTPUT_DIR/checkpoint-N                 a whole checkpoint: it has trainer_state.json,
                                            which transformers writes last (so checkpoints of
                                            runs made before this rule count as whole too)
    OUTPUT_DIR/tmp-checkpoint-N/checkpoint-N a save in progress: every rank writes its part
                                            there (DeepSpeed shards, RNG states); once all
                                            have finished (a barrier) the main process renames
                                            it to OUTPUT_DIR/checkpoint-N (one rename)
    OUTPUT_DIR/incomplete-checkpoint-N      an interrupted save (a partial checkpoint-N, or a
                                            tmp-checkpoint-N), set aside when a run starts:
                                            never resumed, never rotated, never deleted

A kill -9 or a full disk during a save leaves a tmp-checkpoint-N, which neither `resume:
auto` nor `save_total_limit`'s rotation (both see checkpoint-N names only) ever picks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from attnrl.atomic import fsync_dir

STATE_FILE = "trainer_state.json"
CONFIG_NAME = "config.yaml"  # the run's resolved config (trainers/run_dir.py)
STAGING = "tmp-"
ASIDE = "incomplete-"
_NAME = re.compile(r"checkpoint-(\d+)")
_ASIDE_NAME = re.compile(r"checkpoint-(\d+)(\.\d+)?")


def step_of(path) -> int:
    """N of a (tmp-|incomplete-)checkpoint-N directory."""
    return int(Path(str(path)).name.rsplit("-", 1)[1].split(".")[0])


def is_whole(path) -> bool:
    """A checkpoint directory whose save finished: it holds trainer_state.json."""
    return (Path(str(path)) / STATE_FILE).is_file()


def named(output_dir, prefix: str = "") -> list[Path]:
    """Directories PREFIXcheckpoint-N of output_dir (set-aside ones also .K), by step."""
    out = Path(str(output_dir))
    if not out.is_dir():
        return []
    pattern = _ASIDE_NAME if prefix == ASIDE else _NAME
    found = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(prefix)
             and pattern.fullmatch(p.name[len(prefix):])]
    return sorted(found, key=step_of)


def whole(output_dir) -> list[Path]:
    """The whole checkpoint-N directories of output_dir, by step."""
    return [p for p in named(output_dir) if is_whole(p)]


def incomplete(output_dir) -> list[Path]:
    """Interrupted saves in output_dir, by step: checkpoint-N without trainer_state.json and
    tmp-checkpoint-N (set-aside incomplete-checkpoint-N ones are not listed)."""
    partial = [p for p in named(output_dir) if not is_whole(p)]
    return sorted(partial + named(output_dir, STAGING), key=step_of)


def set_aside(path) -> Path:
    """Rename an interrupted save to incomplete-checkpoint-N (.2, .3, ... when taken)."""
    path = Path(str(path))
    target = path.parent / f"{ASIDE}checkpoint-{step_of(path)}"
    number = 1
    while target.exists():
        number += 1
        target = path.parent / f"{ASIDE}checkpoint-{step_of(path)}.{number}"
    os.rename(path, target)
    return target


def set_aside_all(output_dir) -> str | None:
    """Set aside every interrupted save in output_dir; the one line that says so (None when
    there was none)."""
    moved = [(path.name, set_aside(path).name) for path in incomplete(output_dir)]
    if not moved:
        return None
    listed = ", ".join(f"{old} -> {new}" for old, new in moved)
    return (f"output_dir {output_dir}: set aside {len(moved)} incomplete checkpoint"
            f"{'s' if len(moved) > 1 else ''} (a save was interrupted; never resumed): "
            f"{listed}; delete when not needed")



def commit(staging: Path, name: str) -> Path:
    """Move the finished save staging/NAME to OUTPUT_DIR/NAME and remove staging. A
    checkpoint of the same step already there (a run resumed from an earlier one saves the
    step again; transformers overwrote it in place) is replaced."""
    final = staging.parent / name
    if final.exists():
        os.rename(final, staging / "replaced")
    os.rename(staging / name, final)
    os.utime(final)  # the newest by mtime, as transformers' rotation expects
    shutil.rmtree(staging)
    fsync_dir(staging.parent)
    return final


def _record_config(checkpoint: Path) -> None:
    """OUTPUT_DIR/config.yaml copied into the checkpoint (what made it), before it is
    renamed into place."""
    source = checkpoint.parent.parent / CONFIG_NAME
    if source.is_file():
        shutil.copyfile(source, checkpoint / CONFIG_NAME)


def _fix_best(trainer, staged: Path, final: Path) -> None:
    """transformers records best_model_checkpoint under the directory it saved into; point
    it at the checkpoint's final name."""
    best = trainer.state.best_model_checkpoint
    if best is not None and Path(best) == staged:
        trainer.state.best_model_checkpoint = str(final)
        trainer.state.save_to_json(str(staged / STATE_FILE))


@contextlib.contextmanager
def staged_save(trainer, trial):
    """Around a Trainer's _save_checkpoint: the trainer's `_get_output_dir` returns
    OUTPUT_DIR/tmp-checkpoint-N inside (`trainer._staging`), so every rank writes there;
    afterwards, once every rank has finished (a barrier), the main process records the
    config, renames it to OUTPUT_DIR/checkpoint-N and applies save_total_limit to the whole
    checkpoints. An exception inside leaves the tmp- directory (resume never picks it)."""
    out = Path(trainer._get_output_dir(trial))
    name = f"checkpoint-{trainer.state.global_step}"
    staging = out / f"{STAGING}{name}"
    main = trainer.args.should_save
    if main and staging.exists():  # an earlier interrupted save of this step
        print(set_aside_all(out), flush=True)
    trainer.accelerator.wait_for_everyone()
    trainer._staging = str(staging)
    try:
        yield
    finally:
        trainer._staging = None
    trainer.accelerator.wait_for_everyone()  # every rank has written its part
    if main:
        _fix_best(trainer, staging / name, out / name)
        _record_config(staging / name)
        commit(staging, name)
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=str(out), save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint,
                           use_mtime=True)
    trainer.accelerator.wait_for_everyone()  # checkpoint-N exists for every rank
