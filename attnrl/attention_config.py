"""What a model's config says about its attention, read without torch (config checks run
before anything heavy loads): logit softcapping, which layers are softmax attention, the
sampled-layer default, and the attention implementation a model must train with."""

from __future__ import annotations

import json
from pathlib import Path

SOFTCAPPING = ("eager", "flash_attention_2", "flex_attention")
"""Attention implementations that apply `softcap` (sdpa ignores it)."""
SOFTMAX_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
"""`layer_types` entries whose layers compute softmax attention (an attention map)."""


def text_config(config: dict) -> dict:
    """The decoder's part of a config.json mapping (multimodal configs nest it)."""
    return config.get("text_config") or config


def read_config(model) -> dict | None:
    """The decoder config of a local model directory, or None when there is none to read
    (a packaged name such as 'smollm2', or a path without config.json)."""
    path = Path(str(model)).expanduser() / "config.json"
    if not path.is_file():
        return None
    return text_config(json.loads(path.read_text()))


def attention_softcap(config) -> float | None:
    """`attn_logit_softcapping` (Gemma2: scores -> c * tanh(scores / c)) or None. `config`:
    a config.json mapping or a transformers config."""
    if isinstance(config, dict):
        value = text_config(config).get("attn_logit_softcapping")
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "attn_logit_softcapping", None)
    return float(value) if value else None


def attention_implementation(config) -> str:
    """The implementation a model trains with: 'eager' when its attention is softcapped
    (sdpa silently ignores `softcap`; eager applies it), else 'sdpa'."""
    return "eager" if attention_softcap(config) else "sdpa"


def default_layers(num_hidden_layers: int, count: int) -> list[int]:
    """`count` layers evenly spaced over the middle third of the model (the sampled layers
    when none are given)."""
    lo, hi = num_hidden_layers // 3, (2 * num_hidden_layers) // 3
    count = min(count, hi - lo + 1)
    if count <= 1:
        return [lo]
    return sorted({round(lo + i * (hi - lo) / (count - 1)) for i in range(count)})


def non_softmax_layers(config: dict, layers: list[int]) -> dict[int, str]:
    """{layer: its type} for the `layers` (negative: from the end) that `layer_types` marks
    as something other than softmax attention (e.g. 'linear_attention'): they have no
    attention map to read. Empty when the config has no layer_types."""
    types = text_config(config).get("layer_types")
    if not types:
        return {}
    count = len(types)
    return {layer % count: types[layer % count] for layer in layers
            if -count <= layer < count and types[layer % count] not in SOFTMAX_LAYER_TYPES}
