"""Shared pieces of the attention statistics: the float32 math context, the layer's q and k
in float32, reading a transformers mask without an (N, N) copy, and query blocks.

Used by `attnrl.signals.kernels` (log-sum-exp and span), `attnrl.signals.band` (WAAD and FAI
sums), `attnrl.signals.aggregate` and `attnrl.analysis.forward`. Pure torch, no model.

Shapes: query (B, H, N, d), key (B, H_kv, N, d) after rotary (H a multiple of H_kv);
mask None (plain causal) or (B|1, 1|H, N, N), bool (True = attend) or additive float.
"""

from __future__ import annotations

import contextlib

import torch

from attnrl.errors import UserError


def float32_math(device: torch.device) -> contextlib.ExitStack:
    """The context every statistic is computed in: no gradient and autocast off, so the
    math runs in float32 whatever the model's dtype or a trainer's mixed precision."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    with contextlib.suppress(RuntimeError):  # a device type without autocast support
        stack.enter_context(torch.autocast(torch.device(device).type, enabled=False))
    return stack


def float32_qk(query: torch.Tensor, key: torch.Tensor, scaling: float, extra: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's q and k upcast once to float32: scaled queries (B, H, N, d + extra) =
    float32(q) * scaling and keys (B, H_kv, N, d + extra), the `extra` channels zero (a
    kernel's room for the key-position and padding channels). Never a bfloat16 product."""
    B, H, N, d = query.shape
    q = query.new_zeros(B, H, N, d + extra, dtype=torch.float32)
    q[..., :d] = query.detach()
    q[..., :d].mul_(scaling)
    k = key.new_zeros(*key.shape[:3], d + extra, dtype=torch.float32)
    k[..., :d] = key.detach()
    return q, k


# --------------------------------------------------------------------------- masks

def allowed_keys(mask_block: torch.Tensor) -> torch.Tensor:
    """Boolean view of a mask block: True where the key is attended."""
    if mask_block.dtype == torch.bool:
        return mask_block
    return mask_block > torch.finfo(mask_block.dtype).min


def check_causal_rows(mask: torch.Tensor, t0: int, t1: int) -> None:
    """Raise UserError if the mask lets a query in [t0, t1) see a later key."""
    future = allowed_keys(mask[..., t0:t1, t1:]).any() if t1 < mask.shape[-1] else False
    diag = allowed_keys(mask[..., t0:t1, t0:t1])
    upper = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=mask.device).triu(1)
    if future or (diag & upper).any():
        raise UserError("the signal capture needs causal attention (each token sees only "
                        "earlier tokens); this layer's mask lets tokens see later ones")


def check_causal_mask(mask: torch.Tensor | None, block: int = 256) -> None:
    """Raise UserError if `mask` (.., N, N) lets any query attend to a later key."""
    if mask is None:
        return
    for t0 in range(0, mask.shape[-2], block):
        check_causal_rows(mask, t0, min(mask.shape[-2], t0 + block))


def padding_key_mask(mask: torch.Tensor | None, block: int = 256) -> torch.Tensor | None:
    """Check `mask` is causal (UserError if not) and say whether it is a padding mask.

    Returns key_keep (B|1, N) bool when every row t allows exactly the keys s <= t with
    key_keep[s] (causal attention over unpadded keys, what transformers builds for padded
    batches), else None (sliding windows, per-head masks, ...; also for mask None). Reads
    the mask in row blocks: N / block iterations, no (N, N) temporary.
    """
    if mask is None:
        return None
    N = mask.shape[-1]
    keep = allowed_keys(mask[:, :1, -1, :])                    # the last row: every key left
    plain = mask.shape[1] == 1 and mask.shape[-2] == N
    for t0 in range(0, mask.shape[-2], block):
        t1 = min(mask.shape[-2], t0 + block)
        check_causal_rows(mask, t0, t1)
        if plain:
            causal = (torch.arange(t1, device=mask.device)[None, :]
                      <= torch.arange(t0, t1, device=mask.device)[:, None])
            plain = torch.equal(allowed_keys(mask[..., t0:t1, :t1]),
                                keep[..., None, :t1] & causal)
    return keep[:, 0] if plain else None


# --------------------------------------------------------------------------- blocks

def rows_per_block(budget_bytes: int, batch_heads: int, n: int, width: int) -> int:
    """Query rows per block so that a (B*H, rows, rows + width) float32 block fits in
    `budget_bytes`; at least 16, at most n."""
    room = max(1, budget_bytes // (4 * batch_heads))
    rows = int((-width + (width * width + 4 * room) ** 0.5) / 2)
    return max(16, min(n, rows))


def device_budget(block_bytes: int, device: torch.device) -> int:
    """Temporary bytes per block: `block_bytes` on CPU, at least 64 MiB on an accelerator,
    where each block is a handful of kernel launches and launches, not bytes, cost time."""
    return block_bytes if device.type == "cpu" else max(block_bytes, 64 << 20)


class QueryBlocks:
    """Query blocks of one layer: scaled float32 queries grouped by KV head, masked logits.

    `prepared`: `float32_qk(query, key, scaling, extra)` when the caller already has it
    (only its first d channels are read)."""

    def __init__(self, query, key, mask, scaling, prepared=None):
        B, H, N, d = query.shape
        self.B, self.H, self.N, self.d = B, H, N, d
        self.h_kv = key.shape[1]
        self.group = H // self.h_kv
        if key.shape[2] != N:
            raise UserError(f"the signal capture needs a full-sequence forward without a KV "
                            f"cache (got {N} queries for {key.shape[2]} keys); pass "
                            "use_cache=False and no past_key_values")
        q, k = prepared if prepared is not None else float32_qk(query, key, scaling)
        self.q = q.view(B, self.h_kv, self.group, N, q.shape[-1])[..., :d]
        self.k = k[..., :d]
        self.mask = mask
        self.device = query.device

    def logits(self, t0: int, t1: int, c0: int) -> torch.Tensor:
        """(B, H, t1 - t0, t1 - c0) float32 logits of queries [t0, t1) for keys [c0, t1),
        with the layer's mask and causality applied (-inf where not attended)."""
        n = t1 - t0
        qb = self.q[:, :, :, t0:t1].reshape(self.B, self.h_kv, self.group * n, self.d)
        out = torch.matmul(qb, self.k[:, :, c0:t1].transpose(-1, -2))
        out = out.view(self.B, self.H, n, t1 - c0)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(1)
        out[..., t0 - c0:].masked_fill_(causal, float("-inf"))
        if self.mask is not None:
            block = self.mask[..., t0:t1, c0:t1]
            if block.dtype == torch.bool:
                out.masked_fill_(~block, float("-inf"))
            else:
                out.add_(block.float())
        return out
