"""Rollout engines: one interface (`RolloutEngine`); engines: in-process vLLM, a vLLM server,
transformers."""

from attnrl.errors import UserError
from attnrl.rollout.base import Completion, RolloutEngine, SamplingConfig, encode_prompts

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
