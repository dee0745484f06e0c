"""Which attention the capture can compute exactly, and the refusals where it cannot.

Supported: causal softmax attention with any mask transformers builds (padding, sliding
windows), MHA / GQA / MQA, any rotary variant, q/k norms, any `scaling`. Refused with a
UserError naming the model and the feature, instead of silently running another policy:
logit softcapping (Gemma2's `attn_logit_softcapping`, a `softcap` argument) and attention
sinks (gpt-oss' `sinks`, an `s_aux` argument); models whose layers do not call
transformers' attention-function registry.
"""

from __future__ import annotations

import torch

from attnrl.errors import UserError


def unwrap(model):
    """The transformers model inside DeepSpeed / DDP / PEFT wrappers."""
    from transformers import PreTrainedModel

    seen = 0
    while not isinstance(model, PreTrainedModel) and seen < 4:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
        seen += 1
    return model


def cannot_capture(model, why: str) -> UserError:
    """The error for a model the capture cannot run in, saying why."""
    return UserError(f"cannot capture attention signals from {type(model).__name__}: {why}. "
                     "The capture needs a transformers model whose attention layers call "
                     "the attention-function registry (Llama, Qwen2/3, Mistral, Gemma, ...)")


def variant_error(model, feature: str) -> UserError:
    """The error for an attention feature the capture's kernels do not compute."""
    return UserError(f"cannot capture attention signals from {type(model).__name__}: its "
                     f"attention uses {feature}, which the capture's kernels (sdpa) do not "
                     "compute, so the loss forward would run a different policy; use a "
                     "credit strategy without attention signals (uniform, random, entropy, "
                     "bottom_q) for this model")


def check_capture_supported(model) -> None:
    """Raise UserError, before any forward, if `model`'s attention has a feature the capture
    cannot compute exactly: logit softcapping (`attn_logit_softcapping`, Gemma2) or
    attention sinks (a `sinks` parameter in its attention layers, gpt-oss)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap:
        raise variant_error(model, f"logit softcapping (attn_logit_softcapping={softcap})")
    for module in model.modules():
        if hasattr(module, "layer_idx") and isinstance(getattr(module, "sinks", None),
                                                       torch.Tensor):
            raise variant_error(model, "attention sinks (a learned `sinks` logit per head)")


def refuse_attention_variant(model, kwargs: dict) -> None:
    """Raise UserError when a layer passes the attention function an argument sdpa would
    silently ignore (`s_aux` sinks, `softcap`): its output would not be the model's."""
    if kwargs.get("s_aux") is not None:
        raise variant_error(model, "attention sinks (s_aux)")
    if kwargs.get("softcap"):
        raise variant_error(model, f"logit softcapping (softcap={kwargs['softcap']})")
