"""Per-head WAAD and FAI sums of one layer from the band of recent keys
(docs/methods.md sections 1.2-1.3).

Given each row's log-sum-exp (from `attnrl.signals.kernels`), every needed attention entry
is A_ts = exp(scaling q_t.k_s + mask_ts - lse_t), so the capture records per head

- per query t:  WAAD_t = sum_{s<=t} A_ts min(t - s, W)  (and the span, from the kernels)
- per key s:    fai_sum_s = sum_{t in T(s)} A_ts,  T(s) = {t in response: h_lo <= t-s <= h_hi}

reading only the band of the last max(W - 1, h_hi) keys of each query, in query blocks
(N / bq Python iterations). Never an (N, N) matrix: temporaries O(B H bq (bq + band)),
float32 math with autocast off and without gradient, whatever the model's dtype.
"""

from __future__ import annotations

import torch

from attnrl.signals.blocks import (
    QueryBlocks,
    allowed_keys,
    check_causal_mask,
    device_budget,
    float32_math,
    float32_qk,
    rows_per_block,
)
from attnrl.signals.kernels import lse_and_span


def band_statistics(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, lse: torch.Tensor, response: torch.Tensor, window: int,
                    h_lo: int, h_hi: int | None, block_bytes: int = 8 << 20,
                    block_rows: int | None = None, prepared=None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WAAD per query and FAI sums per key from the band of the last max(W-1, h_hi) keys.

    A_ts = exp(scaling q_t.k_s + mask - lse_t). With rows summing to 1,
    WAAD_t = W - sum_{0<=t-s<W} (W - (t-s)) A_ts; fai_sum_s = sum over response t with
    h_lo <= t - s <= h_hi of A_ts. A row whose token does not attend to itself is treated as
    padding: WAAD 0, no FAI contribution. lse (B, H, N); response (B, N) bool. Returns waad
    (B, H, N) in tokens, fai_sum (B, H, N) in attention mass and has_keys (B|1, 1|H, N)
    bool. `block_rows` overrides the rows per block (tests).
    """
    blocks = QueryBlocks(query, key, mask, scaling, prepared)
    B, H, N = blocks.B, blocks.H, blocks.N
    device = blocks.device
    reach = N if h_hi is None else max(window - 1, h_hi)
    if mask is None:
        has_keys = torch.ones(1, 1, N, dtype=torch.bool, device=device)
    else:
        has_keys = allowed_keys(mask.diagonal(dim1=-2, dim2=-1))
    resp = response.to(device=device, dtype=torch.float32)
    coef_all = resp[:, None, :] * has_keys                              # (B, 1|H, N)
    lse = torch.where(torch.isfinite(lse), lse, 0.0).float()
    waad = torch.zeros(B, H, N, device=device)
    fai_sum = torch.zeros(B, H, N, device=device)
    positions = torch.arange(N, device=device, dtype=torch.float32)
    # Rows per block: on CPU about the band width (a wider block mostly computes masked
    # entries); on an accelerator as many as the budget holds (few kernel launches).
    bq = rows_per_block(device_budget(block_bytes, device), B * H, N, min(N, reach))
    bq = min(bq, max(32, min(reach, 128)) if device.type == "cpu" else 512)
    bq = block_rows or bq
    for t0 in range(0, N, bq):
        t1 = min(N, t0 + bq)
        c0 = max(0, t0 - reach)
        logits = blocks.logits(t0, t1, c0)
        if c0 == 0:  # the block holds whole rows: normalise them exactly, as a softmax
            row_lse = torch.logsumexp(logits, -1, keepdim=True)
            row_lse.masked_fill_(~torch.isfinite(row_lse), 0.0)
        else:
            row_lse = lse[:, :, t0:t1, None]
        a = logits.sub_(row_lse).exp_()                                   # (B,H,n,t1-c0)
        dist = positions[t0:t1, None] - positions[None, c0:t1]
        w0 = max(c0, t0 - window + 1) - c0                                # last W keys only
        near = (window - dist[:, w0:]).clamp_(min=0).masked_fill_(dist[:, w0:] < 0, 0.0)
        near_sum = (a[..., w0:] * near).sum(-1)
        waad[:, :, t0:t1] = window * has_keys[..., t0:t1] - near_sum
        in_band = (dist >= h_lo) if h_hi is None else (dist >= h_lo) & (dist <= h_hi)
        coef = coef_all[..., None, t0:t1]                                 # (B, 1|H, 1, n)
        fai_sum[:, :, c0:t1] += torch.matmul(coef, a.mul_(in_band)).squeeze(-2)
    waad.mul_(has_keys)
    return waad, fai_sum, has_keys.expand(B, H, N)


def layer_statistics(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, response: torch.Tensor, window: int, h_lo: int,
                     h_hi: int | None, block_bytes: int = 8 << 20,
                     lse: torch.Tensor | None = None, span: torch.Tensor | None = None,
                     check_mask: bool = True, prepared=None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head WAAD, FAI sums and span of one layer, without an (N, N) matrix.

    query (B, H, N, d), key (B, H_kv, N, d) after rotary; mask None (plain causal) or
    (B|1, 1|H, N, N) bool (True = attend) or additive float; response (B, N) bool.
    `lse` and `span` (B, H, N), when a kernel already gave them, skip the blockwise pass.
    `check_mask`: verify the mask is causal (skip when already checked).
    `prepared`: `float32_qk(query, key, scaling, ...)` when the caller already has it.
    Returns waad (B, H, N) per query (tokens), fai_sum (B, H, N) per key (attention mass)
    and span (B, H, N) per query (tokens), float32; 0 on rows without keys.
    Computed in float32 with autocast off and without gradient, whatever the inputs' dtype.
    """
    with float32_math(query.device):
        if check_mask:
            check_causal_mask(mask)
        if prepared is None:
            prepared = float32_qk(query, key, scaling)
        if lse is None or span is None:
            lse, span = lse_and_span(query, key, mask, scaling, block_bytes, prepared)
        waad, fai_sum, has_keys = band_statistics(query, key, mask, scaling, lse, response,
                                                  window, h_lo, h_hi, block_bytes,
                                                  prepared=prepared)
        span = torch.where(has_keys, span.float(), 0.0)
    return waad, fai_sum, span
