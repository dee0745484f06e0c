"""`attnrl eval`'s engine flags (attnrl/eval_engine.py): what the engine is constructed with,
from the flags, else from the --config run's settings, else the engine's own. Only the
plumbing is checked here (make_engine is replaced), not GPU behaviour."""

import argparse

import pytest
import torch
import yaml

from attnrl import evaluation
from attnrl.errors import UserError
from attnrl.eval_engine import engine_kwargs

RUN = {"task": "chain_sum", "bf16": True, "rollout_kv_cache_gib": 3.0,
       "rollout_gpu_memory_utilization": 0.4, "vllm_tensor_parallel_size": 2}


def _args(*argv):
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    return parser.parse_args(["--model", "smollm2", *argv])


def test_without_flags_or_run_the_engine_keeps_its_defaults():
    assert engine_kwargs(_args(), None, "vllm") == {}


def test_the_run_gives_the_defaults_and_flags_override():
    assert engine_kwargs(_args(), RUN, "vllm") == {
        "dtype": torch.bfloat16, "kv_cache_gib": 3.0, "gpu_memory_utilization": 0.4,
        "tensor_parallel_size": 2}
    args = _args("--dtype", "float32", "--gpu-memory-utilization", "0.9",
                 "--tensor-parallel-size", "4")
    assert engine_kwargs(args, RUN, "vllm") == {
        "dtype": torch.float32, "kv_cache_gib": 3.0, "gpu_memory_utilization": 0.9,
        "tensor_parallel_size": 4}
    # a KV cache given here wins over the run's memory fraction (which would decide on GPUs)
    assert engine_kwargs(_args("--kv-cache-gib", "8"), RUN, "vllm") == {
        "dtype": torch.bfloat16, "kv_cache_gib": 8.0, "tensor_parallel_size": 2}
    assert engine_kwargs(_args(), {**RUN, "bf16": False}, "hf") == {"dtype": torch.float32}


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-gib", "0"], "--kv-cache-gib 0 must be > 0"),
    (["--gpu-memory-utilization", "1.5"], r"--gpu-memory-utilization 1.5 must be in \(0, 1\]"),
])
def test_bad_flags_are_one_line(argv, message):
    with pytest.raises(UserError, match=message):
        engine_kwargs(_args(*argv), None, "vllm")


class _Built(Exception):
    """Stops `attnrl eval` once the engine would be built."""


def test_eval_builds_its_engine_with_the_run_settings(tmp_path, monkeypatch):
    """`attnrl eval --config RUN` constructs the vLLM engine with the run's dtype, memory and
    tensor-parallel size (before: float32, a 1 GiB KV cache, TP 1 whatever the run)."""
    import attnrl.rollout

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(RUN))
    built = {}

    def make_engine(kind, model, **kwargs):
        built.update(kind=kind, **kwargs)
        raise _Built

    monkeypatch.setattr(attnrl.rollout, "make_engine", make_engine)
    args = _args("--config", str(tmp_path), "--num-problems", "2", "-n", "1",
                 "--max-tokens", "8", "--out", str(tmp_path / "out"))
    args.argv = None
    with pytest.raises(_Built):
        evaluation.run(args)
    assert built["kind"] == "vllm" and built["dtype"] == torch.bfloat16
    assert built["gpu_memory_utilization"] == 0.4 and built["kv_cache_gib"] == 3.0
    assert built["tensor_parallel_size"] == 2 and "max_model_len" in built
