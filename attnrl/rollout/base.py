"""The rollout-engine interface shared by the vLLM and transformers engines."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    n: int = 4                  # samples per prompt (the GRPO group size)
    temperature: float = 1.0    # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 128       # completion length cap, in tokens
    seed: int | None = 0        # per-call seed; None draws a fresh one


@dataclass
class Completion:
    """One sampled response. `logprobs[t]` is log pi(token_ids[t] | prefix) under the raw
    model distribution (temperature 1, no top-p): what the trainer needs as pi_old."""

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
    """Generates completions and takes new policy weights without a restart."""

    tokenizer = None

    @abc.abstractmethod
    def generate(self, prompts, sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        """For each prompt (text or token ids), `sampling.n` completions."""

    @abc.abstractmethod
    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new policy weights (HF parameter names) into the engine."""

    def close(self) -> None:
        """Free the engine's resources."""
