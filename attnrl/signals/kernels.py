"""Each row's log-sum-exp and span of a sampled layer: the three ways to get them.

Every statistic needs, per query row t, lse_t = log sum_{s allowed} exp(scaling q_t.k_s +
mask_ts) and span_t = sum_s A_ts (t - s). Which path runs (`SignalCapture._record` decides;
`SignalCapture.paths` and the trainer's `signals/path_<name>` metrics say which ran):

- `fused` (`attention_with_lse`): CPU, float32 q / k / v, no autocast, no dropout. ONE call of
  the fused flash kernel sdpa itself uses on CPU, with a zero channel appended to q and k
  and the key position appended to v, returns the layer's output, lse and sum_s A_ts s
  together, and is differentiable (the kernel's own backward). A padding mask becomes that
  key channel (is_causal), so the kernel skips the keys above the diagonal. It replaces
  sdpa in the layer, with or without gradient checkpointing: under checkpointing the
  recompute replays this same call (`attnrl.signals.capture`), so forward and recompute are
  identical.
- `kernel` (`kernel_lse_and_span`): where the layer's own output must stay sdpa's (bfloat16
  weights or autocast, where a bfloat16 value channel cannot hold key positions; CUDA).
  sdpa gives the output; ONE extra kernel call without gradient on q and k upcast once to
  float32 (key position in the value) gives lse and span: the CPU flash kernel, or on
  CUDA torch's memory-efficient attention (the CUDA kernel that takes float32 and returns
  the log-sum-exp). A padding mask becomes a key channel (is_causal), never an (N, N)
  float copy; CUDA takes only causal and padding masks.
- `blockwise` (`lse_and_span`): the fallback (`use_kernel=False`, devices without a wired
  kernel, CUDA with sliding-window or per-head masks). sdpa gives the output; one pass
  over query blocks against their causal keys, one (B, H, bq, <=N) block of logits at a
  time, gives lse and span.

All returned statistics are float32, without gradient; span's absolute error on the kernel
paths grows as N times the float32 precision (the position channel is summed over N keys).
"""

from __future__ import annotations

import torch

from attnrl.signals.blocks import QueryBlocks, allowed_keys, device_budget, rows_per_block

PATHS = ("fused", "kernel", "blockwise")
"""How a sampled layer's statistics were computed: `fused` (the layer's output, lse and
span from one kernel call, differentiable), `kernel` (sdpa's output; lse and span from one
extra kernel call without gradient), `blockwise` (sdpa's output; lse and span from the
blockwise pass, where no kernel accepts the inputs)."""

_FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"
_PAD_KEY = -1.0e6  # key channel of padded keys: exp(logit - max) underflows to exactly 0


def fused_available(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kwargs: dict) -> bool:
    """Whether `attention_with_lse` computes this layer exactly: CPU, q / k / v all float32,
    autocast off, no dropout, no position bias, sinks or softcapping."""
    # Under autocast (e.g. TRL's bf16 on CPU) q/k/v can arrive in mixed dtypes.
    return (hasattr(torch.ops.aten, _FLASH_CPU) and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not kwargs.get("dropout")
            and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
            and not kwargs.get("softcap"))


def _padding_channel(q: torch.Tensor, k: torch.Tensor, d: int, key_keep: torch.Tensor,
                     scale: float) -> None:
    """Channel d of q (B, H, N, w) and k (B, ..., N, w) made the padding mask, in place:
    q 1, k 0 on kept keys and -1e6 / scale on padded ones (key_keep (B|1, N) bool), so a
    kernel run causal with this `scale` adds exactly 0 to a kept key's logit and gives a
    padded key exp(-1e6 - max) = exactly 0."""
    q[..., d] = 1.0
    keep = key_keep.to(k.device).view(key_keep.shape[0], *[1] * (k.dim() - 3), -1)
    k[..., d] = torch.where(keep, 0.0, _PAD_KEY / scale)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, scaling: float,
                       key_keep: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `fused` path: CPU attention from the same fused kernel sdpa uses, plus each row's
    log-sum-exp and sum_s A_ts s: the value gets one extra channel holding the key position
    (query and key get a zero channel), so one kernel call yields all three. float32 only
    (a bfloat16 channel cannot hold positions above 256 exactly).

    query (B, H, N, d), key / value (B, H_kv, N, d); mask as in `attnrl.signals.blocks`.
    key_keep (B|1, N) bool (`padding_key_mask(mask)`: the mask is causal over these keys):
    the kernel runs causal (it skips the key blocks above the diagonal, about half the work
    of an explicit (N, N) mask) with the padding in the extra channel (query 1, padded key
    -1e6 / scaling: exp underflows to exactly 0), and `mask` is not read. A query row whose
    keys are all padding then averages its padded keys instead of sdpa's masked row; such
    rows are padding themselves and reach no unpadded position.
    Returns (output (B, N, H, d) as transformers' sdpa_attention_forward, differentiable
    with respect to query, key and value through the kernel's backward; lse (B, H, N)
    float32; span (B, H, N) float32 = t - sum_s A_ts s), the last two without gradient.
    Deterministic: the same inputs give the same output bits (a checkpoint recompute).
    """
    B, H, N, d = query.shape
    h_kv = key.shape[1]
    group = H // h_kv
    # one allocation per operand: heads expanded for GQA (as sdpa's repeat_kv) and padded
    q_pad = query.new_zeros(B, H, N, d + 1)
    q_pad[..., :d] = query
    k_pad = key.new_zeros(B, h_kv, group, N, d + 1)
    k_pad[..., :d] = key[:, :, None]
    v_pad = value.new_empty(B, h_kv, group, N, d + 1)
    v_pad[..., :d] = value[:, :, None]
    v_pad[..., d] = torch.arange(N, device=query.device, dtype=value.dtype)
    if key_keep is not None:
        _padding_channel(q_pad, k_pad, d, key_keep, scaling)
        mask = None
    elif mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device
                           ).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(query.dtype)
    out, lse = getattr(torch.ops.aten, _FLASH_CPU)(
        q_pad, k_pad.view(B, H, N, d + 1), v_pad.view(B, H, N, d + 1), 0.0, mask is None,
        attn_mask=mask, scale=scaling)
    positions = torch.arange(N, device=query.device, dtype=torch.float32)
    span = positions - out[..., d].detach().float()
    return out[..., :d].transpose(1, 2).contiguous(), lse.detach().float(), span


def kernel_width(query: torch.Tensor) -> int | None:
    """Head width of the statistics kernel on query's device (d + position and padding
    channels, CUDA: rounded up to a multiple of 8), or None when no kernel is wired."""
    d = query.shape[-1]
    if query.device.type == "cpu" and hasattr(torch.ops.aten, _FLASH_CPU):
        return d + 2
    if query.device.type == "cuda" and hasattr(torch.ops.aten,
                                               "_scaled_dot_product_efficient_attention"):
        return -(-(d + 2) // 8) * 8
    return None


def kernel_lse_and_span(prepared: tuple[torch.Tensor, torch.Tensor], d: int,
                        mask: torch.Tensor | None, key_keep: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The `kernel` path: row log-sum-exp and span from ONE fused kernel call, no gradient.

    prepared: `float32_qk(query, key, scaling, kernel_width(query) - d)`, i.e. float32
    scaled q (B, H, N, w) and k (B, H_kv, N, w) with zero channels d.. w-1 (channel d is
    overwritten here). The value is zero but for channel d = the key position, so the
    kernel returns lse and sum_s A_ts s (span_t = t - that) in one pass over the keys:
    CPU: the flash kernel sdpa uses; CUDA: the memory-efficient kernel.
    mask None: plain causal. key_keep (B|1, N): the mask is causal over unpadded keys
    (`padding_key_mask`): is_causal plus a key channel of -1e6 on padded keys, so no
    (N, N) tensor is built. Any other mask: an additive float32 (B|1, 1|H, N, N) copy on
    CPU; on CUDA None (the caller falls back to the blockwise pass).
    Returns lse (B, H, N), span (B, H, N) float32, or None when no kernel applies.
    """
    q, k = prepared
    B, H, N, width = q.shape
    h_kv = k.shape[1]
    device = q.device
    is_causal = mask is None or key_keep is not None
    if device.type == "cuda" and not is_causal:
        return None
    if key_keep is not None:
        _padding_channel(q, k, d, key_keep, 1.0)
    v = k.new_zeros(B, h_kv, N, width)
    v[..., d] = torch.arange(N, device=device, dtype=torch.float32)
    bias = None
    if not is_causal:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=device
                           ).masked_fill_(~allowed_keys(mask), float("-inf"))
    if device.type == "cpu":
        out, lse = getattr(torch.ops.aten, _FLASH_CPU)(q, k, v, 0.0, is_causal,
                                                       attn_mask=bias, scale=1.0)
    else:
        group = H // h_kv
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, True, scale=1.0)[:2]
        lse = lse[..., :N]
    positions = torch.arange(N, device=device, dtype=torch.float32)
    return lse.float(), positions - out[..., d].float()


def lse_and_span(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float, block_bytes: int = 8 << 20, prepared=None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `blockwise` path: per-row log-sum-exp and span in query blocks over causal keys.

    query (B, H, N, d), key (B, H_kv, N, d); mask as in `attnrl.signals.blocks`. Returns
    lse (B, H, N) (-inf for a row with no allowed key) and span (B, H, N), float32.
    Temporaries: one (B, H, bq, <=N) float32 block. `prepared`: `float32_qk`'s output.
    """
    blocks = QueryBlocks(query, key, mask, scaling, prepared)
    B, H, N = blocks.B, blocks.H, blocks.N
    lse = torch.empty(B, H, N, device=blocks.device)
    span = torch.empty(B, H, N, device=blocks.device)
    positions = torch.arange(N, device=blocks.device, dtype=torch.float32)
    bq = rows_per_block(device_budget(block_bytes, blocks.device), B * H, N, N)
    for t0 in range(0, N, bq):
        t1 = min(N, t0 + bq)
        logits = blocks.logits(t0, t1, 0)
        row_max = logits.amax(-1, keepdim=True)
        row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
        e = logits.sub_(row_max).exp_()
        mass = e.sum(-1)
        # positions relative to the block keep float32 precision for short spans
        rel = torch.matmul(e, positions[:t1] - t0) / mass.clamp(min=1e-30)
        span[:, :, t0:t1] = (positions[t0:t1] - t0) - rel
        lse[:, :, t0:t1] = mass.log() + row_max.squeeze(-1)
    return lse, span
