"""Shared types of the signal code: its configuration, its output, and the top-q rule.

Pure torch. Shapes: B sequences, N positions (prompt + response, padded), L sampled
layers, H query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class SignalConfig:
    """What to compute (docs/methods.md section 1). [P] paper value, [D] chosen here."""

    layers: list[int] | None = None
    """Sampled layer indices. None: five evenly spaced layers in floor(L/3)..floor(2L/3) [P]."""
    num_layers: int = 5
    """How many layers the default selection takes [P]."""
    head_quantile: float = 0.3
    """Fraction of heads (by span) called local (lowest) and global (highest), in (0, 0.5]
    (each set at most half the heads, so they never share one) [P]."""
    freeze_head_split: bool = False
    """Keep the local/global split from the first batch instead of re-ranking per batch [D]."""
    window: int = 10
    """W, the WAAD distance clip [P]."""
    h_lo: int = 10
    """FAI: the nearest future query counted, in tokens after the key [P]."""
    h_hi: int | None = 100
    """FAI: the farthest future query counted; None = to the end of the sequence [P]."""
    q: float = 0.4
    """Top fraction of response tokens marked preplan / anchor [P]."""
    preplan_by: Literal["delta", "waad"] = "delta"
    """Rank preplan tokens by Delta (paper) or by WAAD itself [D]."""
    k: int = 3
    """Coupled rhythm: look-back window for the introductory token [D]."""
    alpha: float = 0.5
    """Coupled rhythm: fraction of a dominated anchor's bonus moved to its intro token [D]."""
    tau_waad: float | None = None
    """WAAD threshold for 'locally dominated'; None = per-response median [D]."""
    tau_delta: float | None = None
    """Delta threshold for 'locally dominated'; None = per-response median [D]."""

    def validate(self) -> SignalConfig:
        """Raise UserError naming the first out-of-range field; return self."""
        from attnrl.errors import UserError

        checks = [
            (self.window >= 1, f"window must be >= 1 (10 in the paper), got {self.window}"),
            (self.h_lo >= 0, f"h_lo must be >= 0 (10 in the paper), got {self.h_lo}"),
            (self.h_hi is None or self.h_hi >= self.h_lo,
             f"h_hi must be >= h_lo ({self.h_lo}) or None (to the end), got {self.h_hi}"),
            (0.0 < self.head_quantile <= 0.5,
             (f"head_quantile must be in (0, 0.5] (0.3 in the paper; above 0.5 local and "
              f"global heads would overlap), got {self.head_quantile}")),
            (0.0 <= self.q <= 1.0, f"q must be in [0, 1] (0.4 in the paper), got {self.q}"),
            (self.k >= 0, f"k must be >= 0 (3 by default), got {self.k}"),
            (self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}"),
            (self.preplan_by in ("delta", "waad"),
             f"preplan_by must be 'delta' or 'waad', got {self.preplan_by!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The sampled layers for a model with `num_hidden_layers` layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if not -num_hidden_layers <= i < num_hidden_layers]
            if bad:
                from attnrl.errors import UserError

                raise UserError(f"signal layers {bad} out of range for a model with "
                                f"{num_hidden_layers} layers (valid 0..{num_hidden_layers - 1})")
            return sorted({i % num_hidden_layers for i in self.layers})
        from attnrl.attention_config import default_layers

        return default_layers(num_hidden_layers, self.num_layers)


@dataclass
class TokenSignals:
    """Per-token signals of a batch. Every (B, N) tensor is aligned with the input
    positions and is 0 / False outside the response."""

    waad: torch.Tensor            # (B, N) float, in tokens (0..W)
    fai: torch.Tensor             # (B, N) float, attention mass (0..1)
    delta: torch.Tensor           # (B, N) float, |WAAD_t - WAAD_{t+1}|
    fai_valid: torch.Tensor       # (B, N) bool, T(s) non-empty (token can be an anchor)
    preplan_mask: torch.Tensor    # (B, N) bool, top-q by Delta (or WAAD)
    anchor_mask: torch.Tensor     # (B, N) bool, top-q by FAI
    dominated_mask: torch.Tensor  # (B, N) bool, anchors that are locally dominated
    intro_mask: torch.Tensor      # (B, N) bool, introductory tokens of dominated anchors
    head_span: torch.Tensor       # (B, L, H) float, mean attention distance in tokens
    local_heads: torch.Tensor     # (L, H) bool
    global_heads: torch.Tensor    # (L, H) bool
    layers: list[int] = field(default_factory=list)


def top_q_mask(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per row, mark the ceil(q * n_valid) largest `values` among `valid` positions.

    values, valid: (B, N). Ties are broken by position (earlier first), so the result is
    deterministic. Returns a (B, N) bool mask that is False where `valid` is False.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    valid = valid.bool()
    masked = values.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    # float64 and a 1e-9 slack: q * n that is an integer in decimal (0.3 * 10) stays one
    counts = torch.ceil(valid.sum(-1).double() * q - 1e-9).long()             # (B,)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                  .expand_as(order).contiguous())
    return (rank < counts.unsqueeze(-1)) & valid


@dataclass
class HeadStats:
    """Per-head, per-token statistics of the sampled layers, before the head split.

    Produced by the capture (or from full maps) and turned into TokenSignals by
    `attnrl.signals.aggregate.token_signals_from_head_stats`. All (B, L, H, N) float32.
    """

    waad: torch.Tensor      # per query t: sum_{s<=t} A_ts min(t - s, W), in tokens
    fai_sum: torch.Tensor   # per key s: sum over t in T(s) of A_ts (T(s) uses the response)
    span: torch.Tensor      # per query t: sum_{s<=t} A_ts (t - s), in tokens
    layers: list[int] = field(default_factory=list)
