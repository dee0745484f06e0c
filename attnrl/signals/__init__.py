"""Attention signals read from the policy's own forward (docs/methods.md sections 1, 2, 5).

- `compute_token_signals(model, input_ids, attention_mask, response_mask, config)`: one call.
- `SignalCapture(model, config, response_mask=...)`: capture inside a forward the caller
  runs anyway (e.g. the training forward), then `capture.token_signals()`.
- `attnrl.signals.reference.reference_token_signals`: the literal definitions from full
  eager attention maps (slow; the oracle in tests).
"""

import importlib

_HOMES = {"token_signals_from_head_stats": "aggregate", "CAPTURE_NAME": "capture",
          "SignalCapture": "capture", "compute_token_signals": "capture",
          "HeadStats": "types", "SignalConfig": "types", "TokenSignals": "types",
          "top_q_mask": "types"}


def __getattr__(name):
    """The names below, imported on first use (so `attnrl signals` can check its arguments
    before torch loads)."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"attnrl.signals.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'attnrl.signals' has no attribute {name!r}")


__all__ = ["CAPTURE_NAME", "HeadStats", "SignalCapture", "SignalConfig", "TokenSignals",
           "compute_token_signals", "token_signals_from_head_stats", "top_q_mask"]
