"""The engine `attnrl eval` builds: its flags (--dtype, --kv-cache-gib,
--gpu-memory-utilization, --tensor-parallel-size) and their defaults, taken from the run
with --config as its training engine ran (trainers/grpo.py, _make_engine), else the
engine's own (float32, a 1 GiB KV cache, one GPU; attnrl/rollout/vllm_engine.py).

    flag                      --config RUN's key
    --dtype                   bf16 (true: bfloat16, else float32)
    --kv-cache-gib            rollout_kv_cache_gib
    --gpu-memory-utilization  rollout_gpu_memory_utilization (null: the KV cache size)
    --tensor-parallel-size    vllm_tensor_parallel_size
"""

from __future__ import annotations

from attnrl.errors import UserError

VLLM_FLAGS = {"kv_cache_gib": "rollout_kv_cache_gib",
              "gpu_memory_utilization": "rollout_gpu_memory_utilization",
              "tensor_parallel_size": "vllm_tensor_parallel_size"}
"""VLLMEngine argument -> the training config key it defaults to (flags of --engine vllm)."""


def add_engine_arguments(parser) -> None:
    """The engine flags of `attnrl eval` (None: the --config run's, else the engine's)."""
    run_or = "default: the --config run's"
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help=f"model dtype in the engine ({run_or}: bfloat16 when it trained "
                        "with bf16, else float32)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help=f"vLLM KV cache in GiB (CPU; GPU without --gpu-memory-utilization)"
                        f" ({run_or} rollout_kv_cache_gib, else 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help=f"vLLM's fraction of GPU memory ({run_or} "
                        "rollout_gpu_memory_utilization, else the KV cache size decides)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help=f"GPUs of one vLLM engine ({run_or} vllm_tensor_parallel_size, "
                        "else 1)")


def _check_flags(args) -> None:
    """UserError (one line) for an engine flag out of range."""
    if args.kv_cache_gib is not None and not args.kv_cache_gib > 0:
        raise UserError(f"--kv-cache-gib {args.kv_cache_gib:g} must be > 0")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization {args.gpu_memory_utilization:g} must be in "
                        "(0, 1]")
    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        raise UserError(f"--tensor-parallel-size {args.tensor_parallel_size} must be >= 1")


def run_dtype(run: dict) -> str | None:
    """The dtype a run's training engine generated in (bf16 true: bfloat16; false:
    float32), None when the config does not say (bf16 absent or null)."""
    bf16 = run.get("bf16")
    return None if bf16 is None else ("bfloat16" if bf16 else "float32")


def engine_kwargs(args, run: dict | None, engine: str) -> dict:
    """make_engine's keyword arguments for `attnrl eval`: each flag, else the --config
    run's value (`run`: its config; None without --config), else left to the engine.
    UserError (before torch loads) for a flag out of range or a vLLM flag with --engine hf."""
    _check_flags(args)
    run = run or {}
    given = [name for name in VLLM_FLAGS if getattr(args, name) is not None]
    if engine != "vllm" and given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} sets the vLLM engine; --engine {engine} has none (use "
                        "--engine vllm, or drop the flag)")
    kwargs = {}
    if engine == "vllm":
        if args.kv_cache_gib is not None and args.gpu_memory_utilization is None:
            run = {k: v for k, v in run.items() if k != "rollout_gpu_memory_utilization"}
        for name, key in VLLM_FLAGS.items():  # a KV cache given here: not the run's fraction
            value = getattr(args, name)
            value = run.get(key) if value is None else value
            if value is not None:
                kwargs[name] = value
    dtype = args.dtype or run_dtype(run)
    if dtype is not None:
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    return kwargs
