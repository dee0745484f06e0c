"""Rollout engines: one interface (`RolloutEngine`); engines: in-process vLLM, a vLLM server,
transformers.

The names of attnrl.rollout.base are loaded on first use, so that `attnrl generate` can
check its arguments without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnrl.errors import UserError

if TYPE_CHECKING:
    from attnrl.rollout.base import RolloutEngine

_BASE_NAMES = ("Completion", "RolloutEngine", "SamplingConfig", "encode_prompts")


def __getattr__(name: str):
    if name in _BASE_NAMES:
        from attnrl.rollout import base

        return getattr(base, name)
    raise AttributeError(f"module 'attnrl.rollout' has no attribute {name!r}")

ENGINES = ("vllm", "vllm_server", "hf")


def make_engine(kind: str, model, **kwargs) -> RolloutEngine:
    """'vllm' (in-process vLLM), 'vllm_server' (a vLLM server process: url=..., see
    attnrl.rollout.server) or 'hf' (transformers generate)."""
    if kind == "vllm":
        from attnrl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, **kwargs)
    if kind == "vllm_server":
        from attnrl.rollout.server import VLLMServerEngine

        return VLLMServerEngine(model, **kwargs)
    if kind == "hf":
        from attnrl.rollout.hf import HFEngine

        return HFEngine.from_pretrained(model, **kwargs)
    raise UserError(f"unknown rollout engine {kind!r}; choose from {', '.join(ENGINES)}")


__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "encode_prompts", "make_engine"]
