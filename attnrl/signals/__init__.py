"""Attention signals read from the policy's own forward (methods.md sections 1, 2, 5).

- `compute_token_signals(model, input_ids, attention_mask, response_mask, config)`: one call.
- `SignalCapture(model, config, response_mask=...)`: capture inside a forward the caller
  runs anyway (e.g. the training forward), then `capture.token_signals()`.
- `attnrl.signals.reference.reference_token_signals`: the literal definitions from full
  eager attention maps (slow; the oracle in tests).
"""

from attnrl.signals.aggregate import compute_token_signals, token_signals_from_head_stats
from attnrl.signals.capture import CAPTURE_NAME, SignalCapture
from attnrl.signals.types import HeadStats, SignalConfig, TokenSignals, top_q_mask

__all__ = ["CAPTURE_NAME", "HeadStats", "SignalCapture", "SignalConfig", "TokenSignals",
           "compute_token_signals", "token_signals_from_head_stats", "top_q_mask"]
