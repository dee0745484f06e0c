"""Quiet by default: the known harmless warnings of the libraries attnrl runs on are filtered
where they are raised (by message, so anything new still shows); `--verbose` keeps them.

Filtered, each of which says nothing a user can act on:
- TRL: "TRL currently supports vLLM versions from 0.22.0 to 0.31.0" (once per TRL module
  that checks; attnrl drives vLLM itself, not through TRL's vLLM client).
- vLLM: "`torch.distributed.reduce_op` is deprecated" (FutureWarning at its import).
- DeepSpeed: "Setting accelerator to CPU" (DeepSpeed's accelerator probe on CPU machines).
- torch: "Triton not available" (CPU builds have no Triton).
- W&B: the Weave advertisement (WANDB_DISABLE_WEAVE).
- vLLM engine start: notes on settings attnrl chooses on purpose (seed, eager mode, no
  chunked prefill, no inductor) and on the CPU build (no Triton, V1 runner, SSM cache,
  thread binding), at the module loggers that log them (vLLM replaces its handlers when
  an engine starts). vLLM's performance hints (LD_PRELOAD of tcmalloc / iomp) stay: a
  user can act on them.
Call `configure()` before importing those libraries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

_MESSAGES = (
    (UserWarning, r"TRL currently supports vLLM versions"),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),
)
_LOG_PREFIXES = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    "torch._library.triton": ("Triton not available",),
}
_VLLM_LOGGERS = ("vllm.engine.arg_utils", "vllm.config.vllm", "vllm.platforms.cpu",
                 "vllm.v1.worker.cpu_worker")

_VLLM_NOTES = (
    "The global random seed is set to",
    "This model does not officially support disabling chunked prefill",
    "Enforce eager set",
    "Inductor compilation was disabled",
    "Triton is not installed",
    "Reset SSM cache type",
    "Model Runner V2 requires Triton",
    "CPU backend doesn't allow to use `torch.set_num_threads`",
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def configure(verbose: bool = False) -> None:
    """Install the filters (idempotent); with verbose=True only raise vLLM's log level.
    Always: vLLM logs to stderr (stdout stays the command's output: tables, JSON), and in a
    log file (stderr not a terminal) no progress bars (phase() prints one line instead)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not is_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        return
    for category, message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in [*_LOG_PREFIXES.items(), *((n, _VLLM_NOTES) for n in _VLLM_LOGGERS)]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")


def is_terminal() -> bool:
    """True when progress bars can redraw in place (stderr is a terminal)."""
    return sys.stderr.isatty()


def versions_line(versions: dict[str, str]) -> str:
    """One start-up line, e.g. 'attnrl 0.1.0 | torch 2.13.0 | trl 1.16.0 | ...'."""
    return " | ".join(f"{name} {version}" for name, version in versions.items())


@contextlib.contextmanager
def phase(label: str, stream=None):
    """A long phase (loading a model, evaluating): at a terminal 'label ...' when it starts;
    always one line 'label: N s' when it ends (a log file gets that one line)."""
    stream = stream or sys.stdout
    if is_terminal():
        print(f"{label} ...", file=stream, flush=True)
    start = time.perf_counter()
    yield
    print(f"{label}: {time.perf_counter() - start:.1f} s", file=stream, flush=True)
