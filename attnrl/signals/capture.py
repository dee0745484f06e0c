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
log-sum-exp lse_t and the span (attention with value = key position):
- fused path (CPU, float32): one call of the fused flash kernel sdpa itself uses on CPU,
  with a zero channel appended to q and k and the key position appended to v, returns the
  output, lse and sum_s A_ts s together: no extra pass over the keys;
- portable path (any device / dtype): sdpa for the output, plus one blockwise pass over
  query blocks against their causal keys for lse and span, one (B, H, bq, t1) block of
  logits at a time.
Then WAAD and FAI read only the band of the last max(W - 1, h_hi) keys of each query, again
in query blocks. Never an (N, N) matrix: temporaries O(B H bq (bq + band)) (portable lse
pass: O(B H bq N)), stored O(B L H N).

Usage (the response mask is needed during the forward, for FAI's sums per key):

    with SignalCapture(model, config, response_mask=response_mask) as capture:
        out = model(input_ids=ids, attention_mask=attention_mask)
    signals = capture.token_signals(attention_mask, response_mask)

`capture.set_batch(attention_mask, response_mask)` sets the masks for the next forward.
"""

from __future__ import annotations

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


class _Blocks:
    """Query blocks of one layer: scaled float32 queries grouped by KV head, masked logits."""

    def __init__(self, query, key, mask, scaling):
        B, H, N, d = query.shape
        self.B, self.H, self.N, self.d = B, H, N, d
        self.h_kv = key.shape[1]
        self.group = H // self.h_kv
        if key.shape[2] != N:
            raise UserError(f"the signal capture needs a full-sequence forward without a KV "
                            f"cache (got {N} queries for {key.shape[2]} keys); pass "
                            "use_cache=False and no past_key_values")
        q = torch.empty(B, H, N, d, device=query.device)               # float32, contiguous
        torch.mul(query.detach(), scaling, out=q)
        self.q = q.view(B, self.h_kv, self.group, N, d)
        self.k = key.detach().to(torch.float32, memory_format=torch.contiguous_format)
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
                 scaling: float, block_bytes: int = 8 << 20
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and span, in query blocks over causal keys (portable path).

    query (B, H, N, d), key (B, H_kv, N, d); mask as `layer_statistics`. Returns lse
    (B, H, N) (-inf for a row with no allowed key) and span (B, H, N) = sum_s A_ts (t - s),
    float32. Temporaries: one (B, H, bq, <=N) block.
    """
    blocks = _Blocks(query, key, mask, scaling)
    B, H, N = blocks.B, blocks.H, blocks.N
    lse = torch.empty(B, H, N, device=blocks.device)
    span = torch.empty(B, H, N, device=blocks.device)
    positions = torch.arange(N, device=blocks.device, dtype=torch.float32)
    bq = _block_rows(block_bytes, B * H, N, N)
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
                    block_rows: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WAAD per query and FAI sums per key from the band of the last max(W-1, h_hi) keys.

    A_ts = exp(scaling q_t.k_s + mask - lse_t). With rows summing to 1,
    WAAD_t = W - sum_{0<=t-s<W} (W - (t-s)) A_ts; fai_sum_s = sum over response t with
    h_lo <= t - s <= h_hi of A_ts. A row whose token does not attend to itself is treated as
    padding: WAAD 0, no FAI contribution. Returns waad (B, H, N), fai_sum (B, H, N) and
    has_keys (B|1, 1|H, N) bool.
    """
    blocks = _Blocks(query, key, mask, scaling)
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
    # Rows per block: about the band width (a wider block mostly computes masked entries).
    bq = block_rows or min(_block_rows(block_bytes, B * H, N, min(N, reach)),
                           max(32, min(reach, 128)))
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
                     check_mask: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head WAAD, FAI sums and span of one layer, without an (N, N) matrix.

    query (B, H, N, d), key (B, H_kv, N, d) after rotary; mask None (plain causal) or
    (B|1, 1|H, N, N) bool (True = attend) or additive float; response (B, N) bool.
    `lse` and `span` (B, H, N), when an attention kernel already gave them, skip the
    blockwise pass. `check_mask`: verify the mask is causal (skip when already checked).
    Returns waad (B, H, N) per query, fai_sum (B, H, N) per key and span
    (B, H, N) per query, float32, in tokens / attention mass; 0 on rows without keys.
    """
    if check_mask:
        check_causal_mask(mask)
    if lse is None or span is None:
        lse, span = lse_and_span(query, key, mask, scaling, block_bytes)
    waad, fai_sum, has_keys = band_statistics(query, key, mask, scaling, lse, response,
                                              window, h_lo, h_hi, block_bytes)
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


# --------------------------------------------------------------------------- registration

class _StopForward(Exception):
    """Ends a signals-only forward after the last sampled layer."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention; in a sampled layer of an active capture, also record statistics."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None and getattr(module, "layer_idx", None) in capture.layers:
        return capture._record(module, query, key, value, attention_mask, kwargs)
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
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._checked_masks: set = set()
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
        self._checked_masks.clear()

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
        cfg = self.config
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        lse = span = None
        # Under gradient checkpointing the backward may recompute this layer after the
        # capture has ended (plain sdpa): keep sdpa's own ops so the recompute matches.
        checkpointed = torch.is_grad_enabled() and getattr(
            self.model, "is_gradient_checkpointing", False)
        if self.use_kernel and not checkpointed and _flash_cpu_available(query, key, value, kwargs):
            with torch.profiler.record_function(PROFILE_REGION):
                output, lse, span = attention_with_lse(query, key, value, attention_mask,
                                                       scaling)
            result = (output, None)
        else:
            result = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            **kwargs)
        if module.layer_idx in self._stats:
            return result
        with torch.no_grad(), torch.profiler.record_function(PROFILE_REGION):
            # layers of one kind share one mask tensor: check its causality once a forward
            mask_id = None if attention_mask is None else (
                attention_mask.data_ptr(), tuple(attention_mask.shape),
                tuple(attention_mask.stride()))
            fresh = mask_id is not None and mask_id not in self._checked_masks
            self._stats[module.layer_idx] = layer_statistics(
                query, key, attention_mask, scaling, self._response, cfg.window, cfg.h_lo,
                cfg.h_hi, self.block_bytes, lse=lse, span=span, check_mask=fresh)
            if fresh:
                self._checked_masks.add(mask_id)
        if self.stop_after_last and len(self._stats) == len(self.layers):
            raise _StopForward
        return result

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
