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
    """What to compute (methods.md section 1). [P] paper value, [D] chosen here."""

    layers: list[int] | None = None
    """Sampled layer indices. None: five evenly spaced layers in floor(L/3)..floor(2L/3) [P]."""
    num_layers: int = 5
    """How many layers the default selection takes [P]."""
    head_quantile: float = 0.3
    """Fraction of heads (by span) called local (lowest) and global (highest) [P]."""
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

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The sampled layers for a model with `num_hidden_layers` layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if not -num_hidden_layers <= i < num_hidden_layers]
            if bad:
                from attnrl.errors import UserError

                raise UserError(f"signal layers {bad} out of range for a model with "
                                f"{num_hidden_layers} layers (valid 0..{num_hidden_layers - 1})")
            return sorted({i % num_hidden_layers for i in self.layers})
        lo, hi = num_hidden_layers // 3, (2 * num_hidden_layers) // 3
        count = min(self.num_layers, hi - lo + 1)
        if count <= 1:
            return [lo]
        return sorted({round(lo + i * (hi - lo) / (count - 1)) for i in range(count)})


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
    counts = torch.ceil(valid.sum(-1).float() * q).long()                     # (B,)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                  .expand_as(order).contiguous())
    return (rank < counts.unsqueeze(-1)) & valid
