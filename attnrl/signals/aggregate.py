"""From per-head statistics to per-token signals and token sets (docs/methods.md sections 1.1-1.5).

- `token_signals_from_head_stats(stats, response_mask, config)`: head split, head means,
  FAI normalisation, Delta and the token sets; used by the capture
  (`attnrl.signals.capture`, which also holds the one-call `compute_token_signals`).
Pure math on per-head statistics: this module does not import the capture.

Choices where the paper is silent:
- Head split: each head's span is pooled over the whole batch as a token-weighted mean
  over all response tokens; the lowest / highest ceil(quantile * L * H) heads of the
  sampled layers are local / global (ties: lower (layer, head) index first).
- Delta_t = |WAAD_t - WAAD_{t+1}| when t and t+1 are both response tokens, else 0.
- Dominated anchors and intro tokens look back over u in t-k..t-1 that are response tokens;
  a token with no such u is never dominated. intro(t) = earliest argmax of Delta_u.
- tau defaults are per-response lower medians (the ((n - 1) // 2)-th smallest value).
"""

from __future__ import annotations

import math

import torch

from attnrl.errors import UserError
from attnrl.signals.blocks import float32_math
from attnrl.signals.types import HeadStats, SignalConfig, TokenSignals, top_q_mask


def fai_counts(response: torch.Tensor, h_lo: int, h_hi: int | None) -> torch.Tensor:
    """|T(s)| per position: response queries t with s + h_lo <= t <= min(N-1, s + h_hi).
    response (B, N) bool -> (B, N) float32."""
    B, N = response.shape
    before = torch.zeros(B, N + 1, device=response.device)
    before[:, 1:] = response.float().cumsum(-1)                  # before[i] = #R in [0, i)
    s = torch.arange(N, device=response.device)
    start = (s + h_lo).clamp(max=N)
    stop = torch.full_like(s, N) if h_hi is None else (s + h_hi + 1).clamp(max=N)
    count = before[:, stop] - before[:, start]
    return count.clamp(min=0)


def select_heads(span: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (lowest span) and global (highest span) heads. span (L, H) -> two (L, H) bool.
    Heads are ranked once by span (ties: the lower (layer, head) index ranks lower); each
    set has ceil(quantile * L * H) heads, at least 1 and at most half of them, so the two
    sets never share a head (except a model of one sampled head, which is both)."""
    if not 0.0 < quantile <= 0.5:
        raise UserError(f"head_quantile must be in (0, 0.5] (0.3 in the paper; above 0.5 local "
                        f"and global heads would overlap), got {quantile}")
    flat = span.reshape(-1).float()
    n = flat.numel()
    count = max(1, math.ceil(quantile * n - 1e-9))
    if n >= 2:
        count = min(count, n // 2)
    order = torch.sort(flat, stable=True).indices
    local = torch.zeros_like(flat, dtype=torch.bool)
    global_ = torch.zeros_like(flat, dtype=torch.bool)
    local[order[:count]] = True
    global_[order[n - count:]] = True
    return local.view(span.shape), global_.view(span.shape)


def head_span_totals(stats: HeadStats, response_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sums behind the pooled head span: each head's span summed over all response
    tokens of the batch, (L, H) float64, and the number of response tokens, () float64.
    Both add up over batches and processes; the split of their union is
    select_heads(span_total / tokens, quantile)."""
    response = response_mask.to(stats.span.device).bool()
    span_total = (stats.span.double() * response[:, None, None, :]).sum((0, 3))
    return span_total, response.sum().double()


def delta_from_waad(waad: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Delta_t = |WAAD_t - WAAD_{t+1}| where t, t+1 are response tokens, else 0. (B, N)."""
    delta = torch.zeros_like(waad)
    both = response[:, :-1] & response[:, 1:]
    delta[:, :-1] = torch.where(both, (waad[:, :-1] - waad[:, 1:]).abs(), 0.0)
    return delta


def masked_lower_median(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, the ((n - 1) // 2)-th smallest of `values` where `valid`; 0 if n = 0.
    (B, N) -> (B,)."""
    ordered = torch.sort(values.float().masked_fill(~valid, float("inf")), dim=-1).values
    n = valid.sum(-1)
    idx = ((n - 1).clamp(min=0) // 2).unsqueeze(-1)
    return torch.where(n > 0, ordered.gather(-1, idx).squeeze(-1), 0.0)


def lookback_max(delta: torch.Tensor, response: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max and earliest argmax of Delta_u over response u in t-k..t-1.
    Returns (max (B, N), argmax position (B, N) long, has_any (B, N) bool)."""
    N = delta.shape[1]
    cols = []
    for j in range(k, 0, -1):                                    # u = t - j, ascending
        shifted = torch.full_like(delta, float("-inf"))
        if j < N:
            shifted[:, j:] = delta[:, :-j].masked_fill(~response[:, :-j], float("-inf"))
        cols.append(shifted)
    if not cols:
        empty = torch.zeros_like(delta)
        return empty, torch.zeros_like(delta, dtype=torch.long), empty.bool()
    stacked = torch.stack(cols, dim=-1)                         # (B, N, k)
    best, which = stacked.max(dim=-1)                           # first max = earliest u
    t = torch.arange(N, device=delta.device)
    return best, t - (k - which), torch.isfinite(best)


def token_sets(waad: torch.Tensor, fai: torch.Tensor, fai_valid: torch.Tensor,
               response: torch.Tensor, config: SignalConfig):
    """Delta and the preplan / anchor / dominated / intro masks, each (B, N)."""
    delta = delta_from_waad(waad, response)
    config.validate()
    rank_by = delta if config.preplan_by == "delta" else waad
    preplan = top_q_mask(rank_by, response, config.q)
    anchor = top_q_mask(fai, fai_valid, config.q)
    B = waad.shape[0]
    tau_w = (masked_lower_median(waad, response) if config.tau_waad is None
             else torch.full((B,), float(config.tau_waad), device=waad.device))
    tau_d = (masked_lower_median(delta, response) if config.tau_delta is None
             else torch.full((B,), float(config.tau_delta), device=waad.device))
    best, where, has = lookback_max(delta, response, config.k)
    dominated = (anchor & has & (waad <= tau_w[:, None]) & (best >= tau_d[:, None]))
    intro = torch.zeros_like(dominated)
    rows, cols = dominated.nonzero(as_tuple=True)
    intro[rows, where[rows, cols]] = True
    return delta, preplan, anchor, dominated, intro


def token_signals_from_head_stats(stats: HeadStats, response_mask: torch.Tensor,
                                  config: SignalConfig,
                                  head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                                  ) -> TokenSignals:
    """Head split, head means and token sets. stats (B, L, H, N); response_mask (B, N).
    `head_split` (local, global) (L, H) bool overrides the split from this batch's spans.
    float32 math with autocast off (a trainer may call it inside its mixed precision)."""
    with float32_math(stats.waad.device):
        return _token_signals(stats, response_mask, config, head_split)


def _token_signals(stats, response_mask, config, head_split) -> TokenSignals:
    stats = HeadStats(waad=stats.waad.float(), fai_sum=stats.fai_sum.float(),
                      span=stats.span.float(), layers=stats.layers)
    device = stats.waad.device
    response = response_mask.to(device).bool()
    resp = response.float()[:, None, None, :]                              # (B, 1, 1, N)
    n_resp = response.sum(-1).float()                                      # (B,)
    if n_resp.sum() == 0:
        raise UserError("response_mask has no response tokens: mark the completion tokens")
    span_sum = (stats.span * resp).sum(-1)                                 # (B, L, H)
    head_span = span_sum / n_resp.clamp(min=1)[:, None, None]
    if head_split is None:
        local, global_ = select_heads(span_sum.sum(0) / n_resp.sum(), config.head_quantile)
    else:
        local, global_ = (h.to(device).bool() for h in head_split)
        if tuple(local.shape) != tuple(span_sum.shape[1:]) or local.shape != global_.shape:
            raise UserError(f"head_split has shape {tuple(local.shape)}, expected "
                            f"(layers, heads) = {tuple(span_sum.shape[1:])}")
        if not local.any() or not global_.any():
            raise UserError("head_split needs at least one local and one global head")
    w_loc = local.float()[None, :, :, None] / local.sum()
    w_glob = global_.float()[None, :, :, None] / global_.sum()
    waad = (stats.waad * w_loc).sum((1, 2)) * response
    count = fai_counts(response, config.h_lo, config.h_hi)
    fai_valid = response & (count > 0)
    fai_mean_sum = (stats.fai_sum * w_glob).sum((1, 2))
    fai = torch.where(fai_valid, fai_mean_sum / count.clamp(min=1), 0.0)
    delta, preplan, anchor, dominated, intro = token_sets(waad, fai, fai_valid, response,
                                                          config)
    return TokenSignals(waad=waad, fai=fai, delta=delta, fai_valid=fai_valid,
                        preplan_mask=preplan, anchor_mask=anchor, dominated_mask=dominated,
                        intro_mask=intro, head_span=head_span, local_heads=local,
                        global_heads=global_, layers=list(stats.layers))
