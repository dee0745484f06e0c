"""Several ablation runs at once (`--workers N`): each run's child process gets a slot of
its own, N disjoint sets of CPU cores on a CPU machine or one GPU each on a GPU node (a run
is one process), so runs in parallel never share a core or a device.

A slot reaches the child through its environment: ATTNRL_CPU_AFFINITY="0,1" (the child
pins itself with os.sched_setaffinity before torch starts its threads; vLLM's CPU thread
binding follows the affinity) or CUDA_VISIBLE_DEVICES. A run computes the same numbers in
any slot: its thread count (OMP_NUM_THREADS, 1 by default in the ablation) is unchanged,
only where the threads run.

    slots = worker_slots(2)                   # [{'cpus': [0]}, {'cpus': [1]}] on 2 cores
    env = slot_env(slots[1], os.environ)      # ATTNRL_CPU_AFFINITY=1 for that child
"""

from __future__ import annotations

import os
import shutil
import subprocess

from attnrl.errors import UserError

AFFINITY_ENV = "ATTNRL_CPU_AFFINITY"


def visible_gpus(environ=None) -> list[str]:
    """The GPUs a child may use: CUDA_VISIBLE_DEVICES if set, else the ones `nvidia-smi -L`
    lists (none on a machine without it). No torch import."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def split_evenly(items: list, parts: int) -> list[list]:
    """[0..7] in 3 parts -> [0,1,2], [3,4,5], [6,7] (contiguous, sizes differ by <= 1)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def worker_slots(workers: int, cpus=None, gpus=None) -> list[dict]:
    """N slots: {'gpus': [one]} where GPUs are visible (each run on its own GPU), else
    {'cpus': [...]} (each run on its own cores). One worker: one slot with no pinning.
    Raises UserError when there are fewer cores or GPUs than workers."""
    if workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more (runs at the same time)")
    if workers == 1:
        return [{}]
    gpus = visible_gpus() if gpus is None else list(gpus)
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if gpus:
        if workers > len(gpus):
            raise UserError(f"--workers {workers} but {len(gpus)} GPU(s) are visible "
                            f"({','.join(gpus)}): each run needs a GPU of its own; give "
                            f"--workers {len(gpus)} or fewer")
        if workers < len(gpus):  # a run is one process: more GPUs in a slot stay idle
            print(f"# --workers {workers}: GPUs {','.join(gpus[:workers])} run the ablation, "
                  f"{','.join(gpus[workers:])} stay idle (one process, one GPU per run; "
                  f"give --workers {len(gpus)} to use them all)", flush=True)
        return [{"gpus": [gpu]} for gpu in gpus[:workers]]
    if workers > len(cpus):
        raise UserError(f"--workers {workers} but this process may use {len(cpus)} CPU "
                        f"core(s): each run needs a core of its own; give --workers "
                        f"{len(cpus)} or fewer")
    return [{"cpus": chunk} for chunk in split_evenly(cpus, workers)]


def slot_env(slot: dict, environ) -> dict:
    """The child's environment for `slot` (a copy of `environ`)."""
    env = dict(environ)
    if "gpus" in slot:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot["gpus"])
    if "cpus" in slot:
        env[AFFINITY_ENV] = ",".join(map(str, slot["cpus"]))
    return env


def describe(slot: dict) -> str:
    if "gpus" in slot:
        return f"GPU {','.join(slot['gpus'])}"
    if "cpus" in slot:
        return f"CPU {','.join(map(str, slot['cpus']))}"
    return "all cores"


def pin_from_env(environ=None) -> list[int] | None:
    """Child side: pin this process to ATTNRL_CPU_AFFINITY's cores (before torch starts
    threads). Returns the cores, or None when the variable is unset."""
    environ = os.environ if environ is None else environ
    value = environ.get(AFFINITY_ENV)
    if not value:
        return None
    cores = [int(c) for c in value.split(",")]
    os.sched_setaffinity(0, cores)
    return cores


def idle_core_hint(workers: int, environ=None, cpus=None, gpus=None) -> str | None:
    """A line for a CPU ablation that leaves cores idle: one worker, one thread per run
    (OMP_NUM_THREADS unset or 1: the runs' default) and more than one core. None otherwise."""
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if cpus is None else len(list(cpus))
    if workers != 1 or cores < 2 or environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    if visible_gpus(environ) if gpus is None else gpus:  # nvidia-smi only when it matters
        return None
    return (f"# each run uses 1 thread and this machine has {cores} cores: --workers {cores} "
            f"would run {cores} at a time (the same numbers, about {cores}x sooner)")
