"""The rollout-engine interface shared by the vLLM and transformers engines."""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from attnrl.rollout.seeds import SampleSeeds, call_seeds, check_seeds


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    n: int = 4                  # samples per prompt (the GRPO group size)
    temperature: float = 1.0    # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 128       # completion length cap, in tokens
    seed: int | None = 0        # call seed: sample j of prompt p is seeded with
                                # sample_seed(seed, p, j) (attnrl.rollout.seeds); None: unseeded


@dataclass
class Completion:
    """One sampled response. `logprobs[t]` is log q(token_ids[t] | prefix) under the
    distribution the token was drawn from: the model's logits divided by the temperature,
    then restricted to the top-p nucleus and renormalized (vLLM's `processed_logprobs`).
    With top_p = 1 this is exactly what TRL's trainer computes as its per-token log-probs
    (log_softmax(logits / temperature)), so TRL's importance-sampling correction and
    off-policy mask compare like with like; with top_p < 1 they differ from TRL's by the
    log of the nucleus mass, as with TRL's own vLLM (which also reports
    `processed_logprobs`). Greedy (temperature 0): the raw model log-probs (temperature 1)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "length"       # 'stop' (eos) or 'length'
    extra: dict = field(default_factory=dict)


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    """Token ids for each prompt. Text that already begins with the BOS token (chat
    templates often add it) is encoded without adding another one."""
    encoded = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            encoded.append([int(t) for t in prompt])
            continue
        bos = tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        encoded.append(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    return encoded


class RolloutEngine(abc.ABC):
    """Generates completions and takes new policy weights without a restart.

    Generation ahead of training (`rollout_lag` 1, trainers/rollout_lag.py) uses the pair
    `submit` / `collect`: one batch at a time is in flight, and every completion collected
    carries `extra["weight_version"]`, the `weight_version` the engine held when the batch
    was submitted (the trainer sets it to the optimizer step whose weights it pushed).
    Synchronous by default (`submit` generates before it returns); engines that generate
    apart from training (the vLLM server) start the batch in a thread and return at once.
    """

    tokenizer = None
    weight_version: int = 0
    _pending = None  # the batch in flight: {"version", "future", "submitted", "done"}
    last_generate_s: float | None = None
    """Seconds the last collected batch took from its submit to its last completion."""

    @abc.abstractmethod
    def generate(self, prompts, sampling: SamplingConfig, progress: bool = False,
                 seeds: SampleSeeds | None = None) -> list[list[Completion]]:
        """For each prompt (text or token ids), `sampling.n` completions. `seeds[p][j]`
        seeds sample j of prompt p (its own random stream); None: derived from
        `sampling.seed` (see `sample_seeds`)."""

    @abc.abstractmethod
    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new policy weights (HF parameter names) into the engine."""

    def update_weights_stream(self, names: list[str],
                              chunks: Iterable[dict[str, torch.Tensor]]) -> None:
        """Load new policy weights that arrive chunk by chunk: `names` lists every HF name
        the chunks will give (known before the first chunk), `chunks` yields
        {name: tensor}. A chunk's tensors are valid only until the next chunk is requested
        (e.g. gathered ZeRO-3 parameters, released after): copy what must outlive it. Every
        chunk must be consumed (each may be a collective of the trainer's ranks). This
        default joins copies of all chunks, then calls `update_weights` (the whole model in
        memory); engines override it to load chunk by chunk."""
        state = {}
        for chunk in chunks:
            state.update({k: v.detach().clone() for k, v in chunk.items()})
        check_stream_names(names, state)
        self.update_weights(state)

    # ------------------------------------------------------------------ generation ahead
    def submit(self, prompts, sampling: SamplingConfig,
               seeds: SampleSeeds | None = None) -> None:
        """Start generating `prompts` (as `generate`); RuntimeError while a batch is in
        flight (collect it first)."""
        if self._pending is not None:
            raise RuntimeError("a generation batch is already in flight: collect it before "
                               "submitting another")
        pending = {"version": self.weight_version, "submitted": time.perf_counter(),
                   "done": None}
        pending["future"] = self._start(prompts, sampling, seeds)
        pending["future"].add_done_callback(
            lambda _: pending.__setitem__("done", time.perf_counter()))
        self._pending = pending

    def _start(self, prompts, sampling, seeds) -> Future:
        """The groups of `prompts`, as a future: here generated before returning."""
        done = Future()
        done.set_result(self.generate(prompts, sampling, seeds=seeds))
        return done

    @property
    def in_flight(self) -> bool:
        """A submitted batch is not collected yet."""
        return self._pending is not None

    def collect(self) -> tuple[list[list[Completion]], float]:
        """The groups of the batch in flight, each completion tagged with the weight version
        that generated it, and the seconds this call waited for them. RuntimeError when
        nothing is in flight."""
        if self._pending is None:
            raise RuntimeError("no generation batch in flight: submit one first")
        pending, start = self._pending, time.perf_counter()
        try:
            groups = pending["future"].result()
        finally:
            self._pending = None
        self.last_generate_s = (pending["done"] or time.perf_counter()) - pending["submitted"]
        version = pending["version"]
        for group in groups:
            for completion in group:
                completion.extra["weight_version"] = version
        return groups, time.perf_counter() - start

    def drain(self) -> None:
        """Wait until the batch in flight (if any) has finished generating; it stays ready
        for `collect`. A weight push must not meet a running batch: call this first."""
        if self._pending is not None:
            self._pending["future"].exception()  # waits; an error is raised by collect

    def discard(self) -> None:
        """Wait for the batch in flight (if any) and drop it (end of training)."""
        if self._pending is not None:
            self._pending["future"].exception()
            self._pending = None

    def check_idle(self) -> None:
        """RuntimeError when a submitted batch is still generating (no weight push then)."""
        if self._pending is not None and not self._pending["future"].done():
            raise RuntimeError("weights pushed while a generation batch is in flight: "
                               "drain() the engine first")

    def sleep(self) -> None:
        """Free device memory until the next generation or weight update (engines that can:
        the in-process vLLM engine built with enable_sleep_mode); by default nothing."""

    def close(self) -> None:
        """Free the engine's resources (a batch in flight is waited for and dropped)."""
        self.discard()


def check_stream_names(names: list[str], delivered) -> None:
    """RuntimeError unless the chunks of a weight stream gave exactly the announced names."""
    if set(delivered) != set(names):
        lost, extra = sorted(set(names) - set(delivered)), sorted(set(delivered) - set(names))
        raise RuntimeError(f"weight stream gave other names than announced: missing "
                           f"{lost[:8]}, unannounced {extra[:8]}")


def sample_seeds(sampling: SamplingConfig, num_prompts: int,
                 seeds: SampleSeeds | None = None) -> SampleSeeds | None:
    """The per-sample seeds of a generate call: `seeds` if given (checked: one list of
    `sampling.n` per prompt), else derived from the call seed (None when it is None)."""
    if seeds is None:
        return call_seeds(sampling.seed, num_prompts, sampling.n)
    check_seeds(seeds, num_prompts, sampling.n)
    return [[int(s) for s in row] for row in seeds]
