"""Attention signals read from the policy's own forward (methods.md sections 1, 2, 5)."""

from attnrl.signals.types import SignalConfig, TokenSignals, top_q_mask

__all__ = ["SignalConfig", "TokenSignals", "top_q_mask"]
