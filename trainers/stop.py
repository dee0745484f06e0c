"""Stopping a training job on SIGINT (Ctrl-C) or SIGTERM (kill; SLURM before the end of an
allocation) with a whole checkpoint (imports nothing heavy).

While `run_job` runs (trainers/cli.py), SignalStop handles both signals:

- during training, the first signal sets a flag and prints one line; at the end of the step
  in progress StopCallback (trainers/callbacks.py) makes the Trainer save checkpoint-N and
  stop. The job skips final/, releases output_dir's lock, prints
  `stopped by SIGTERM at step N: checkpoint-N saved in OUT; resume with ...` and raises
  Interrupted: `attnrl train` exits 130 (SIGINT) or 143 (SIGTERM), 128 + the signal, as a
  shell reports a process killed by it, so `attnrl train && next` does not go on.
  With several ranks the flag is max-reduced across them at every step end (one int
  all_reduce per step), so every rank stops at the same step even when only some of them
  got the signal.
- a second signal during training exits at once (os._exit, same codes) after releasing the
  lock: no checkpoint is written, the last whole one stays (a save it cuts short is left as
  tmp-checkpoint-N, never resumed: trainers/checkpoints.py). The same signal again within
  `repeat_s` (1 s) is a copy of the first, not a second request: torchrun forwards the
  signal it gets to workers that got it too (Ctrl-C reaches the whole foreground process
  group; SLURM signals every process of a step). torchrun kills its workers
  `--shutdown_timeout` seconds (default 30) after forwarding: give it at least a step and a
  save.
- before training starts (loading, checks) and after it ends, a signal raises Interrupted
  where the job is: it unwinds, the lock is released, one line, the same exit codes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from attnrl.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say(line: str) -> None:
    """One line on stderr, safe inside a signal handler (no buffered print)."""
    os.write(2, (line + "\n").encode())


class SignalStop:
    """The SIGINT / SIGTERM handlers of one job (a context manager: installed on enter, the
    previous handlers restored on exit; nothing outside the main thread). `release` runs
    before a second signal exits at once (the output_dir lock)."""

    repeat_s = 1.0
    """The same signal again within this many seconds is a copy of the first."""

    def __init__(self, release=None):
        self.release = release
        self.training = False      # between on_train_begin and on_train_end
        self.trained = False       # training has ended
        self.received: int | None = None   # the first signal during training
        self.stopped_at: int | None = None  # the step the run stopped at (its checkpoint)
        self._previous: dict = {}
        self._first = 0.0          # time.monotonic() of the first signal

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def install(self) -> None:
        """(Re)install the handlers (a library may have replaced them meanwhile)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            if previous != self._handle and signum not in self._previous:
                self._previous[signum] = previous

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            where = "after training (the checkpoints are whole; rerun to finish)" \
                if self.trained else "before training started; nothing was saved"
            raise Interrupted(signum, f"stopped by {name} {where}")
        if self.received is None:
            self.received, self._first = signum, time.monotonic()
            _say(f"{name}: stopping after the step in progress, with a checkpoint ({name} "
                 "again exits at once, without one)")
            return
        if signum == self.received and time.monotonic() - self._first < self.repeat_s:
            return  # the same signal delivered twice (torchrun forwarding it)
        _say(f"second {name}: exiting now, without a checkpoint (earlier checkpoints stay whole)")
        if self.release is not None:
            self.release()
        os._exit(128 + signum)


def agreed(signum: int, device) -> int:
    """The largest signal number any rank received (0: none), when torch.distributed runs
    several ranks; `signum` itself otherwise. One int all_reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    value = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def barrier() -> None:
    """Wait for every rank (torch.distributed running several), else nothing: the ranks of
    a stopped run exit together, once rank 0 has released the lock and said how to resume
    (torchrun signals the others as soon as one exits)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def stopped_line(signum: int, step: int, output_dir, resume, overwrite: bool) -> str:
    """The last line of a stopped run: where its checkpoint is and how to resume it."""
    name = signal.Signals(signum).name
    if resume == "auto" and not overwrite:
        how = "resume with the same command (resume: auto)"
    else:
        how = "resume with the same command plus --resume auto" + \
            (", without --overwrite" if overwrite else "")
    return f"stopped by {name} at step {step}: checkpoint-{step} saved in {output_dir}; {how}"
