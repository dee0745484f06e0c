"""Signal capture inside the policy's own forward (methods.md 1.7, design.md step 4).

An attention function registered with transformers' `AttentionInterface` as
"attnrl_capture" (with the sdpa mask function registered under the same name in
`AttentionMaskInterface`, so every layer still receives its padding / sliding-window mask).
Layers that are not sampled call sdpa untouched. In a sampled layer the output is still
sdpa's (same kernel or sdpa itself; gradients flow as through sdpa) and, without gradient,
from the query and key the layer holds (after rotary, GQA heads expanded, the layer's
`scaling` and mask) the capture records per head:

- per query t:  WAAD_t = sum_{s<=t} A_ts min(t - s, W)  and  span_t = sum_{s<=t} A_ts (t - s)
- per key s:    fai_sum_s = sum_{t in T(s)} A_ts,  T(s) = {t in response: h_lo <= t-s <= h_hi}

Every needed entry is A_ts = exp(scaling q_t.k_s + mask_ts - lse_t), so it needs each row's
log-sum-exp lse_t and the span (attention with value = key position). Three paths
(`SignalCapture.paths` says which one each layer took; the trainer logs `signals/path_*`):
- fused (CPU, float32, no gradient checkpointing, no autocast): one call of the fused
  flash kernel sdpa itself uses on CPU, with a zero channel appended to q and k and the key
  position appended to v, returns the output, lse and sum_s A_ts s together: no extra pass;
- kernel (everything else where a kernel is wired: gradient checkpointing, bf16 weights,
  autocast, CUDA): sdpa's own ops for the output (so a checkpoint recompute after the
  capture matches and gradients are sdpa's), plus ONE extra kernel call without gradient on
  q and k upcast once to float32 (key position in the value) for lse and span: the CPU
  flash kernel, or on CUDA torch's memory-efficient attention (the CUDA kernel that takes
  float32 and returns the log-sum-exp). A padding mask becomes a key channel (is_causal),
  never an (N, N) float copy;
- blockwise (fallback: `use_kernel=False`, other devices, CUDA with masks other than
  causal + padding such as sliding windows): sdpa for the output, plus one blockwise pass
  over query blocks against their causal keys, one (B, H, bq, t1) block of logits at a time.
Then WAAD and FAI read only the band of the last max(W - 1, h_hi) keys of each query, again
in query blocks (N / bq Python iterations). Never an (N, N) matrix: temporaries
O(B H bq (bq + band)) (blockwise lse pass: O(B H bq N)), stored O(B L H N). All statistics
are float32 math with autocast off and without gradient, whatever the model's dtype.

Attention the capture cannot compute exactly is refused (UserError naming the model and
the feature) instead of silently running another policy: logit softcapping (Gemma2's
`attn_logit_softcapping`, a `softcap` argument) and attention sinks (gpt-oss' `sinks`, an
`s_aux` argument). Non-causal attention and KV caches are refused too.

Usage (the response mask is needed during the forward, for FAI's sums per key):

    with SignalCapture(model, config, response_mask=response_mask) as capture:
        out = model(input_ids=ids, attention_mask=attention_mask)
    signals = capture.token_signals(attention_mask, response_mask)

`capture.set_batch(attention_mask, response_mask)` sets the masks for the next forward.
"""

from __future__ import annotations

import contextlib

import torch

from attnrl.errors import UserError
from attnrl.signals.types import HeadStats, SignalConfig, TokenSignals

CAPTURE_NAME = "attnrl_capture"
PROFILE_REGION = "attnrl_signal_capture"  # torch.profiler region of the capture's own work
_CAPTURE_ATTR = "_attnrl_signal_capture"
_registered = False


# --------------------------------------------------------------------------- the band math

def _allowed_keys(mask_block: torch.Tensor) -> torch.Tensor:
    """Boolean view of a mask block: True where the key is attended."""
    if mask_block.dtype == torch.bool:
        return mask_block
    return mask_block > torch.finfo(mask_block.dtype).min


def _check_causal(mask: torch.Tensor, t0: int, t1: int) -> None:
    """Raise if the layer's mask lets a query in [t0, t1) see a later key."""
    future = _allowed_keys(mask[..., t0:t1, t1:]).any() if t1 < mask.shape[-1] else False
    diag = _allowed_keys(mask[..., t0:t1, t0:t1])
    upper = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=mask.device).triu(1)
    if future or (diag & upper).any():
        raise UserError("the signal capture needs causal attention (each token sees only "
                        "earlier tokens); this layer's mask lets tokens see later ones")


def _block_rows(budget_bytes: int, batch_heads: int, n: int, width: int) -> int:
    """Query rows per block so that a (B*H, rows, rows + width) float32 block fits."""
    room = max(1, budget_bytes // (4 * batch_heads))
    rows = int((-width + (width * width + 4 * room) ** 0.5) / 2)
    return max(16, min(n, rows))


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


def _device_budget(block_bytes: int, device: torch.device) -> int:
    """Temporary bytes per block: `block_bytes` on CPU, at least 64 MiB on an accelerator,
    where each block is a handful of kernel launches and launches, not bytes, cost time."""
    return block_bytes if device.type == "cpu" else max(block_bytes, 64 << 20)


class _Blocks:
    """Query blocks of one layer: scaled float32 queries grouped by KV head, masked logits."""

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
        """(B, H, t1 - t0, t1 - c0) logits of queries [t0, t1) for keys [c0, t1), with the
        layer's mask and causality applied (-inf where not attended)."""
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


def lse_and_span(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float, block_bytes: int = 8 << 20, prepared=None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and span, in query blocks over causal keys (blockwise fallback).

    query (B, H, N, d), key (B, H_kv, N, d); mask as `layer_statistics`. Returns lse
    (B, H, N) (-inf for a row with no allowed key) and span (B, H, N) = sum_s A_ts (t - s),
    float32. Temporaries: one (B, H, bq, <=N) block. `prepared`: `float32_qk`'s output.
    """
    blocks = _Blocks(query, key, mask, scaling, prepared)
    B, H, N = blocks.B, blocks.H, blocks.N
    lse = torch.empty(B, H, N, device=blocks.device)
    span = torch.empty(B, H, N, device=blocks.device)
    positions = torch.arange(N, device=blocks.device, dtype=torch.float32)
    bq = _block_rows(_device_budget(block_bytes, blocks.device), B * H, N, N)
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


def band_statistics(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, lse: torch.Tensor, response: torch.Tensor, window: int,
                    h_lo: int, h_hi: int | None, block_bytes: int = 8 << 20,
                    block_rows: int | None = None, prepared=None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WAAD per query and FAI sums per key from the band of the last max(W-1, h_hi) keys.

    A_ts = exp(scaling q_t.k_s + mask - lse_t). With rows summing to 1,
    WAAD_t = W - sum_{0<=t-s<W} (W - (t-s)) A_ts; fai_sum_s = sum over response t with
    h_lo <= t - s <= h_hi of A_ts. A row whose token does not attend to itself is treated as
    padding: WAAD 0, no FAI contribution. Returns waad (B, H, N), fai_sum (B, H, N) and
    has_keys (B|1, 1|H, N) bool. One Python iteration per block of about the band's width
    rows: N / bq iterations, temporaries O(B H bq (bq + band)).
    """
    blocks = _Blocks(query, key, mask, scaling, prepared)
    B, H, N = blocks.B, blocks.H, blocks.N
    device = blocks.device
    reach = N if h_hi is None else max(window - 1, h_hi)
    if mask is None:
        has_keys = torch.ones(1, 1, N, dtype=torch.bool, device=device)
    else:
        has_keys = _allowed_keys(mask.diagonal(dim1=-2, dim2=-1))
    resp = response.to(device=device, dtype=torch.float32)
    coef_all = resp[:, None, :] * has_keys                              # (B, 1|H, N)
    lse = torch.where(torch.isfinite(lse), lse, 0.0).float()
    waad = torch.zeros(B, H, N, device=device)
    fai_sum = torch.zeros(B, H, N, device=device)
    positions = torch.arange(N, device=device, dtype=torch.float32)
    # Rows per block: on CPU about the band width (a wider block mostly computes masked
    # entries); on an accelerator as many as the budget holds (few kernel launches).
    bq = _block_rows(_device_budget(block_bytes, device), B * H, N, min(N, reach))
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


def check_causal_mask(mask: torch.Tensor | None, block: int = 256) -> None:
    """Raise UserError if `mask` (.., N, N) lets any query attend to a later key."""
    if mask is None:
        return
    for t0 in range(0, mask.shape[-2], block):
        _check_causal(mask, t0, min(mask.shape[-2], t0 + block))


def layer_statistics(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, response: torch.Tensor, window: int, h_lo: int,
                     h_hi: int | None, block_bytes: int = 8 << 20,
                     lse: torch.Tensor | None = None, span: torch.Tensor | None = None,
                     check_mask: bool = True, prepared=None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head WAAD, FAI sums and span of one layer, without an (N, N) matrix.

    query (B, H, N, d), key (B, H_kv, N, d) after rotary; mask None (plain causal) or
    (B|1, 1|H, N, N) bool (True = attend) or additive float; response (B, N) bool.
    `lse` and `span` (B, H, N), when an attention kernel already gave them, skip the
    blockwise pass. `check_mask`: verify the mask is causal (skip when already checked).
    `prepared`: `float32_qk(query, key, scaling, ...)` when the caller already has it.
    Returns waad (B, H, N) per query, fai_sum (B, H, N) per key and span
    (B, H, N) per query, float32, in tokens / attention mass; 0 on rows without keys.
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


def _flash_cpu_available(query, key, value, kwargs) -> bool:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    # Under autocast (e.g. TRL's bf16 on CPU) q/k/v can arrive in mixed dtypes.
    return (op is not None and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not kwargs.get("dropout")
            and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
            and not kwargs.get("softcap"))


def attention_with_lse(query, key, value, mask, scaling):
    """CPU attention from the same fused kernel sdpa uses, plus each row's log-sum-exp and
    sum_s A_ts s: the value gets one extra channel holding the key position (query and
    key get a zero channel), so one kernel call yields all three. float32 only (a bfloat16
    channel cannot hold positions above 256 exactly).

    Returns (output (B, N, H, d) as sdpa_attention_forward, lse (B, H, N) float32,
    span (B, H, N) float32 = t - sum_s A_ts s; its absolute error grows as N times the
    float32 precision). Gradients flow to query, key and value as through sdpa.
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
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device
                           ).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(query.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_pad, k_pad.view(B, H, N, d + 1), v_pad.view(B, H, N, d + 1), 0.0, mask is None,
        attn_mask=mask, scale=scaling)
    positions = torch.arange(N, device=query.device, dtype=torch.float32)
    span = positions - out[..., d].detach().float()
    return out[..., :d].transpose(1, 2).contiguous(), lse.detach().float(), span


def padding_key_mask(mask: torch.Tensor | None, block: int = 256) -> torch.Tensor | None:
    """Check `mask` is causal (UserError if not) and say whether it is a padding mask.

    mask (B|1, 1|H, N, N) bool (True = attend) or additive float, or None (plain causal).
    Returns key_keep (B|1, N) bool when every row t allows exactly the keys s <= t with
    key_keep[s] (causal attention over unpadded keys, what transformers builds for padded
    batches), else None (sliding windows, per-head masks, ...). Reads the mask in row
    blocks: N / block iterations, no (N, N) temporary.
    """
    if mask is None:
        return None
    N = mask.shape[-1]
    keep = _allowed_keys(mask[:, :1, -1, :])                   # the last row: every key left
    plain = mask.shape[1] == 1 and mask.shape[-2] == N
    for t0 in range(0, mask.shape[-2], block):
        t1 = min(mask.shape[-2], t0 + block)
        _check_causal(mask, t0, t1)
        if plain:
            causal = (torch.arange(t1, device=mask.device)[None, :]
                      <= torch.arange(t0, t1, device=mask.device)[:, None])
            plain = torch.equal(_allowed_keys(mask[..., t0:t1, :t1]), keep[..., None, :t1] & causal)
    return keep[:, 0] if plain else None


_PAD_KEY = -1.0e6  # key channel of padded keys: exp(logit - max) underflows to exactly 0


def kernel_width(query: torch.Tensor) -> int | None:
    """Head width of the statistics kernel on query's device (d + position and padding
    channels, CUDA: rounded up to a multiple of 8), or None when no kernel is wired."""
    d = query.shape[-1]
    if query.device.type == "cpu" and hasattr(torch.ops.aten,
                                              "_scaled_dot_product_flash_attention_for_cpu"):
        return d + 2
    if query.device.type == "cuda" and hasattr(torch.ops.aten,
                                               "_scaled_dot_product_efficient_attention"):
        return -(-(d + 2) // 8) * 8
    return None


def kernel_lse_and_span(prepared: tuple[torch.Tensor, torch.Tensor], d: int,
                        mask: torch.Tensor | None, key_keep: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row log-sum-exp and span from ONE fused attention kernel call, without gradient.

    prepared: `float32_qk(query, key, scaling, kernel_width(query) - d)`, i.e. float32
    scaled q (B, H, N, w) and k (B, H_kv, N, w) with zero channels d.. w-1 (channel d is
    overwritten here). The value is zero but for channel d = the key position, so the
    kernel returns lse and sum_s A_ts s (span_t = t - that) in one pass over the keys:
    CPU: the flash kernel sdpa uses (`_scaled_dot_product_flash_attention_for_cpu`);
    CUDA: the memory-efficient kernel (`_scaled_dot_product_efficient_attention`), the
    CUDA kernel that takes float32 and returns the log-sum-exp.
    mask None: plain causal. key_keep (B|1, N): the mask is causal over unpadded keys
    (`padding_key_mask`): is_causal plus a key channel of -1e6 on padded keys, so no
    (N, N) tensor is built. Any other mask: an additive float32 (B|1, 1|H, N, N) copy on
    CPU; on CUDA None (the caller falls back to the blockwise pass).
    Returns lse (B, H, N), span (B, H, N) float32 (span's absolute error grows as N times
    the float32 precision), or None when no kernel applies.
    """
    q, k = prepared
    B, H, N, width = q.shape
    h_kv = k.shape[1]
    device = q.device
    is_causal = mask is None or key_keep is not None
    if device.type == "cuda" and not is_causal:
        return None
    if key_keep is not None:
        q[..., d] = 1.0
        k[..., d] = torch.where(key_keep.to(device)[:, None, :], 0.0, _PAD_KEY)
    v = k.new_zeros(B, h_kv, N, width)
    v[..., d] = torch.arange(N, device=device, dtype=torch.float32)
    bias = None
    if not is_causal:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=device
                           ).masked_fill_(~_allowed_keys(mask), float("-inf"))
    if device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=1.0)
    else:
        group = H // h_kv
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, True, scale=1.0)[:2]
        lse = lse[..., :N]
    positions = torch.arange(N, device=device, dtype=torch.float32)
    return lse.float(), positions - out[..., d].float()


PATHS = ("fused", "kernel", "blockwise")
"""How a sampled layer's statistics were computed: `fused` (the layer's output, lse and
span from one kernel call), `kernel` (sdpa's output; lse and span from one extra kernel
call without gradient), `blockwise` (sdpa's output; lse and span from the blockwise
pass, where no kernel accepts the inputs)."""


# --------------------------------------------------------------------------- registration

class _StopForward(Exception):
    """Ends a signals-only forward after the last sampled layer."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention; in a sampled layer of an active capture, also record statistics."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None and getattr(module, "layer_idx", None) in capture.layers:
        return capture._record(module, query, key, value, attention_mask, kwargs)
    refuse_attention_variant(capture.model if capture is not None else module, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register the capture attention and mask functions with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(CAPTURE_NAME, _capture_attention)
        AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
        _registered = True
    return CAPTURE_NAME


def _unwrap(model):
    """The transformers model inside DeepSpeed / DDP / PEFT wrappers."""
    from transformers import PreTrainedModel

    seen = 0
    while not isinstance(model, PreTrainedModel) and seen < 4:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
        seen += 1
    return model


def _cannot_capture(model, why: str) -> UserError:
    return UserError(f"cannot capture attention signals from {type(model).__name__}: {why}. "
                     "The capture needs a transformers model whose attention layers call "
                     "the attention-function registry (Llama, Qwen2/3, Mistral, Gemma, ...)")


def _variant_error(model, feature: str) -> UserError:
    return UserError(f"cannot capture attention signals from {type(model).__name__}: its "
                     f"attention uses {feature}, which the capture's kernels (sdpa) do not "
                     "compute, so the loss forward would run a different policy; use a "
                     "credit strategy without attention signals (uniform, random, entropy, "
                     "bottom_q) for this model")


def check_capture_supported(model) -> None:
    """Raise UserError, before any forward, if `model`'s attention has a feature the capture
    cannot compute exactly: logit softcapping (`attn_logit_softcapping`, Gemma2) or
    attention sinks (a `sinks` parameter in its attention layers, gpt-oss). Supported:
    causal softmax attention with any mask transformers builds (padding, sliding windows),
    MHA / GQA / MQA, any rotary variant, q/k norms, any `scaling`."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap:
        raise _variant_error(model, f"logit softcapping (attn_logit_softcapping={softcap})")
    for module in model.modules():
        if hasattr(module, "layer_idx") and isinstance(getattr(module, "sinks", None),
                                                       torch.Tensor):
            raise _variant_error(model, "attention sinks (a learned `sinks` logit per head)")


def refuse_attention_variant(model, kwargs: dict) -> None:
    """Raise UserError when a layer passes the attention function an argument sdpa would
    silently ignore (`s_aux` sinks, `softcap`): its output would not be the model's."""
    if kwargs.get("s_aux") is not None:
        raise _variant_error(model, "attention sinks (s_aux)")
    if kwargs.get("softcap"):
        raise _variant_error(model, f"logit softcapping (softcap={kwargs['softcap']})")


# --------------------------------------------------------------------------- the capture

class SignalCapture:
    """Context manager: switch `model` to the capture attention, record the sampled
    layers' statistics during each forward, restore the attention implementation on exit.

    The response mask (B, N) must be known before the forward: pass `response_mask=` here or
    call `set_batch(attention_mask, response_mask)`. Statistics of the most recent forward
    are kept (a new forward of the model replaces them; a gradient-checkpointing recompute
    does not). `stop_after_last=True` (signals-only use, via `run`) skips the layers after
    the last sampled one. A given `head_split` (local, global), each (L, H) bool, is used for
    every batch; else with `config.freeze_head_split` the first batch's split is kept.
    `use_kernel=False` forces the portable path (what non-CPU devices and bfloat16 use).

    With gradient checkpointing, the capture keeps sdpa's own ops in the sampled layers so
    that a backward run after the `with` block recomputes them identically.
    """

    def __init__(self, model, config: SignalConfig | None = None,
                 response_mask: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                 block_bytes: int = 8 << 20, stop_after_last: bool = False,
                 use_kernel: bool = True):
        self.model = _unwrap(model)
        self.use_kernel = use_kernel
        self.stop_after_last = stop_after_last
        self.config = (config or SignalConfig()).validate()
        self.block_bytes = int(block_bytes)
        text_config = getattr(self.model, "config", None)
        if text_config is None or not hasattr(text_config, "_attn_implementation"):
            raise _cannot_capture(model, "it is not a transformers model")
        if hasattr(text_config, "get_text_config"):
            text_config = text_config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        self.layers = self.config.resolve_layers(self.num_layers)
        self.head_split = head_split
        self._modules = [m for m in self.model.modules() if hasattr(m, "layer_idx")
                         and "attention" in type(m).__name__.lower()]
        if not self._modules or not self.model._can_set_attn_implementation():
            raise _cannot_capture(model, "its attention layers do not go through "
                                         "transformers' attention-function registry")
        check_capture_supported(self.model)
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._mask_plans: dict = {}
        self.paths: dict[int, str] = {}  # layer -> how its statistics were computed (PATHS)
        self._response: torch.Tensor | None = None
        self._previous: str | None = None
        self._hook = None
        if response_mask is not None:
            self.set_batch(attention_mask, response_mask)

    # -- batch and lifecycle
    def set_batch(self, attention_mask: torch.Tensor | None, response_mask: torch.Tensor):
        """Masks of the next forward: attention_mask (B, N) 1 = token (None: no padding),
        response_mask (B, N) True on response tokens."""
        response = torch.as_tensor(response_mask).bool()
        if response.dim() != 2:
            raise UserError(f"response_mask must be (batch, seq_len), got shape "
                            f"{tuple(response.shape)}")
        if attention_mask is not None:
            attention = torch.as_tensor(attention_mask).bool()
            if attention.shape != response.shape:
                raise UserError(f"attention_mask {tuple(attention.shape)} and response_mask "
                                f"{tuple(response.shape)} must have the same shape")
            if (response & ~attention.to(response.device)).any():
                raise UserError("response_mask marks padding positions (attention_mask 0): "
                                "mark only real response tokens")
        self._response = response
        return self

    def __enter__(self):
        register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(CAPTURE_NAME)
        if self.model.config._attn_implementation != CAPTURE_NAME:
            raise _cannot_capture(self.model, "its attention implementation cannot be "
                                              "switched")
        for module in self._modules:
            setattr(module, _CAPTURE_ATTR, self)
        self._hook = self.model.register_forward_pre_hook(lambda *_: self._new_forward())
        return self

    def __exit__(self, *exc):
        for module in self._modules:
            if getattr(module, _CAPTURE_ATTR, None) is self:
                delattr(module, _CAPTURE_ATTR)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)
            self._previous = None
        return False

    def _new_forward(self) -> None:
        self._stats.clear()
        self._mask_plans.clear()
        self.paths.clear()

    # -- recording (called from the attention function)
    def _record(self, module, query, key, value, attention_mask, kwargs):
        """Attention output of a sampled layer (as sdpa), recording its statistics once per
        forward (a gradient-checkpointing recompute runs the same ops, records nothing)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self._response is None:
            raise UserError("the signal capture needs the response mask before the forward: "
                            "SignalCapture(model, config, response_mask=...) or "
                            "capture.set_batch(attention_mask, response_mask)")
        B, _, N, _ = query.shape
        if tuple(self._response.shape) != (B, N):
            raise UserError(f"response_mask has shape {tuple(self._response.shape)} but the "
                            f"forward has batch {B} and length {N}: call set_batch with this "
                            "batch's masks")
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if attention_mask is None and not is_causal:
            raise UserError("the signal capture needs causal attention; this layer is "
                            "bidirectional")
        refuse_attention_variant(self.model, kwargs)
        cfg = self.config
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        lse = span = None
        # Under gradient checkpointing the backward may recompute this layer after the
        # capture has ended (plain sdpa): keep sdpa's own ops so the recompute matches.
        checkpointed = torch.is_grad_enabled() and getattr(
            self.model, "is_gradient_checkpointing", False)
        fused = (self.use_kernel and not checkpointed
                 and _flash_cpu_available(query, key, value, kwargs))
        if fused:
            with torch.profiler.record_function(PROFILE_REGION):
                output, lse, span = attention_with_lse(query, key, value, attention_mask,
                                                       scaling)
            result = (output, None)
        else:
            result = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            **kwargs)
        if module.layer_idx in self._stats:
            return result
        with float32_math(query.device), torch.profiler.record_function(PROFILE_REGION):
            key_keep = self._mask_plan(attention_mask)
            width = None if fused or not self.use_kernel else kernel_width(query)
            d = query.shape[-1]
            prepared = float32_qk(query, key, scaling, 0 if width is None else width - d)
            path = "fused" if fused else "blockwise"
            if width is not None:
                got = kernel_lse_and_span(prepared, d, attention_mask, key_keep)
                if got is not None:
                    (lse, span), path = got, "kernel"
            self._stats[module.layer_idx] = layer_statistics(
                query, key, attention_mask, scaling, self._response, cfg.window, cfg.h_lo,
                cfg.h_hi, self.block_bytes, lse=lse, span=span, check_mask=False,
                prepared=prepared)
            self.paths[module.layer_idx] = path
        if self.stop_after_last and len(self._stats) == len(self.layers):
            raise _StopForward
        return result

    def _mask_plan(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """`padding_key_mask(mask)`, once per forward for each distinct mask tensor (layers
        of one kind share one mask)."""
        if mask is None:
            return None
        mask_id = (mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()))
        if mask_id not in self._mask_plans:
            self._mask_plans[mask_id] = padding_key_mask(mask)
        return self._mask_plans[mask_id]

    def path_metrics(self) -> dict[str, float]:
        """Fraction of the sampled layers whose statistics took each path (`PATHS`) in the
        last forward, as `signals/path_<name>`."""
        count = max(1, len(self.paths))
        return {f"signals/path_{name}": sum(p == name for p in self.paths.values()) / count
                for name in PATHS}

    def run(self, **inputs):
        """Call the model on `inputs` (use_cache=False). With `stop_after_last`, the forward
        stops once the last sampled layer is recorded and None is returned."""
        try:
            return self.model(**inputs, use_cache=False)
        except _StopForward:
            return None

    # -- results
    def head_stats(self) -> HeadStats:
        """The recorded statistics of the last forward, stacked as (B, L, H, N)."""
        missing = [l for l in self.layers if l not in self._stats]
        if missing:
            if not self._stats:
                raise _cannot_capture(self.model, "no sampled layer went through the capture "
                                                  "attention (was the forward run inside the "
                                                  "`with SignalCapture(...)` block?)")
            raise _cannot_capture(self.model, f"layers {missing} did not go through the "
                                              "capture attention")
        stack = [torch.stack([self._stats[l][i] for l in self.layers], dim=1)
                 for i in range(3)]
        return HeadStats(waad=stack[0], fai_sum=stack[1], span=stack[2],
                         layers=list(self.layers))

    def token_signals(self, attention_mask: torch.Tensor | None = None,
                      response_mask: torch.Tensor | None = None) -> TokenSignals:
        """TokenSignals of the last forward. The masks, if given, are checked against the
        ones the forward was captured with."""
        from attnrl.signals.aggregate import token_signals_from_head_stats

        stats = self.head_stats()
        if response_mask is not None and not torch.equal(
                torch.as_tensor(response_mask).bool().cpu(), self._response.cpu()):
            raise UserError("response_mask differs from the one the forward was captured "
                            "with: call set_batch(attention_mask, response_mask) before it")
        if attention_mask is not None and (
                self._response.cpu() & ~torch.as_tensor(attention_mask).bool().cpu()).any():
            raise UserError("the captured response_mask marks padding positions of this "
                            "attention_mask: pass the batch's own masks")
        signals = token_signals_from_head_stats(stats, self._response, self.config,
                                                head_split=self.head_split)
        if self.config.freeze_head_split and self.head_split is None:
            self.head_split = (signals.local_heads, signals.global_heads)
        return signals
