"""Signal capture inside the policy's own forward (docs/methods.md section 1.7,
docs/design.md step 4).

An attention function registered with transformers' `AttentionInterface` as
"attnrl_capture" (with the sdpa mask function registered under the same name in
`AttentionMaskInterface`, so every layer still receives its padding / sliding-window mask).
Layers that are not sampled call sdpa untouched. A sampled layer computes its output and,
without gradient, from the query and key it holds (after rotary, the layer's `scaling` and
mask) records per head WAAD, FAI sums and span (`attnrl.signals.band`), from each row's
log-sum-exp and span (`attnrl.signals.kernels`). Which path runs when:

- `fused`: CPU, float32, no autocast: the layer's output, lse and span come from ONE
  differentiable call of the CPU flash kernel (key position in an extra value channel),
  with or without gradient checkpointing;
- `kernel`: bfloat16 weights, autocast or CUDA: sdpa's output plus one kernel call without
  gradient for lse and span;
- `blockwise`: the fallback (`use_kernel=False`, no kernel for the device or the mask):
  sdpa's output plus a blockwise pass.
`SignalCapture.paths` / `reasons` say which path each sampled layer took and why; the
first use of each path is logged (logger "attnrl.signals", INFO); the trainer logs
`signals/path_*`.

Gradient checkpointing (transformers' `gradient_checkpointing_enable`, what TRL uses): the
backward recomputes each layer, usually after the `with` block has restored the model's own
attention implementation. So during the capture the function each checkpointed layer hands
to torch's checkpoint is wrapped: the recompute runs with the capture's attention installed
and replays the forward's calls (fused where the forward ran fused, sdpa elsewhere, with the
mask the forward built) without recording anything. Forward and recompute are the same
calls by construction, whatever implementation the model was loaded with (eager, sdpa,
flash_attention_2). A model checkpointed by other means (the layers are not transformers'
checkpointed layers) keeps sdpa's output in every layer, and is refused unless it was
loaded with sdpa (its recompute would run another implementation).

Attention the capture cannot compute exactly is refused (`attnrl.signals.variants`).
Non-causal attention and KV caches are refused too.

Usage (the response mask is needed during the forward, for FAI's sums per key):

    with SignalCapture(model, config, response_mask=response_mask) as capture:
        out = model(input_ids=ids, attention_mask=attention_mask)
    signals = capture.token_signals(attention_mask, response_mask)

`capture.set_batch(attention_mask, response_mask)` sets the masks for the next forward;
`compute_token_signals(...)` is the one-call form.
"""

from __future__ import annotations

import contextvars
import logging

import torch

from attnrl.errors import UserError
from attnrl.signals.aggregate import token_signals_from_head_stats
from attnrl.signals.band import layer_statistics
from attnrl.signals.blocks import float32_math, float32_qk, padding_key_mask
from attnrl.signals.kernels import (
    PATHS,
    attention_with_lse,
    fused_available,
    kernel_lse_and_span,
    kernel_width,
)
from attnrl.signals.types import HeadStats, SignalConfig, TokenSignals
from attnrl.signals.variants import (
    cannot_capture,
    check_capture_supported,
    refuse_attention_variant,
    unwrap,
)

CAPTURE_NAME = "attnrl_capture"
PROFILE_REGION = "attnrl_signal_capture"  # torch.profiler region of the capture's own work
_CAPTURE_ATTR = "_attnrl_signal_capture"
_registered = False
logger = logging.getLogger("attnrl.signals")

# The forward plan being replayed by a checkpoint recompute (None outside one), and whether
# the current call runs inside a checkpointed layer the capture has wrapped.
_REPLAY: contextvars.ContextVar = contextvars.ContextVar("attnrl_capture_replay", default=None)
_PINNED: contextvars.ContextVar = contextvars.ContextVar("attnrl_capture_pinned", default=False)


def _scaling(query: torch.Tensor, kwargs: dict) -> float:
    return kwargs.get("scaling") or query.shape[-1] ** -0.5


def _sdpa(module, query, key, value, attention_mask, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# --------------------------------------------------------------------------- checkpointing

class _ForwardPlan:
    """The output call each sampled layer of one forward ran ("fused" or "sdpa"; layers not
    listed ran sdpa), so that a checkpoint recompute of that forward replays it."""

    def __init__(self):
        self.outputs: dict[int, str] = {}
        self.key_keep: dict[int, torch.Tensor | None] = {}  # fused layers' padding plan

    def replay(self, module, query, key, value, attention_mask, kwargs):
        """The forward's attention call of this layer again; records nothing."""
        layer = getattr(module, "layer_idx", None)
        if self.outputs.get(layer) == "fused":
            output = attention_with_lse(query, key, value, attention_mask,
                                        _scaling(query, kwargs), self.key_keep.get(layer))[0]
            return output, None
        return _sdpa(module, query, key, value, attention_mask, kwargs)


class _PinnedCall:
    """The function a checkpointed layer hands to torch's checkpoint, wrapped. The first
    call is the forward inside the capture; every later call is a recompute (in the
    backward, usually after the capture ended): it runs with the capture attention
    installed on `configs` and replays `plan`."""

    def __init__(self, function, plan: _ForwardPlan, configs: list):
        self.function, self.plan, self.configs = function, plan, configs
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            token = _PINNED.set(True)
            try:
                return self.function(*args, **kwargs)
            finally:
                _PINNED.reset(token)
        token = _REPLAY.set(self.plan)
        saved = [(config, config._attn_implementation_internal) for config in self.configs]
        try:
            for config, _ in saved:
                config._attn_implementation_internal = CAPTURE_NAME
            return self.function(*args, **kwargs)
        finally:
            for config, value in reversed(saved):
                config._attn_implementation_internal = value
            _REPLAY.reset(token)


class _PinningCheckpoint:
    """Stands in for a layer's `_gradient_checkpointing_func` during a capture: hands torch's
    checkpoint a `_PinnedCall` bound to the current forward's plan."""

    def __init__(self, original, capture: SignalCapture):
        self.original, self.capture = original, capture

    def __call__(self, function, *args, **kwargs):
        pinned = _PinnedCall(function, self.capture._plan, self.capture._configs)
        return self.original(pinned, *args, **kwargs)


# --------------------------------------------------------------------------- registration

class _StopForward(Exception):
    """Ends a signals-only forward after the last sampled layer."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention; in a sampled layer of an active capture, also record statistics; in
    a checkpoint recompute, the forward's own call."""
    plan = _REPLAY.get()
    if plan is not None:
        return plan.replay(module, query, key, value, attention_mask, kwargs)
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is None:
        refuse_attention_variant(module, kwargs)
        return _sdpa(module, query, key, value, attention_mask, kwargs)
    if getattr(module, "layer_idx", None) in capture.layers:
        return capture._record(module, query, key, value, attention_mask, kwargs)
    capture._unpinned_checkpoint()  # refuses a recompute that would run another attention
    refuse_attention_variant(capture.model, kwargs)
    return _sdpa(module, query, key, value, attention_mask, kwargs)


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


def _checkpointed_layers(model) -> list:
    """transformers' gradient-checkpointing layers of `model` (its decoder layers)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


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
    `use_kernel=False` forces the blockwise path. Under gradient checkpointing the backward,
    inside or after the `with` block, recomputes each layer with the forward's own calls
    (module docstring).
    """

    def __init__(self, model, config: SignalConfig | None = None,
                 response_mask: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                 block_bytes: int = 8 << 20, stop_after_last: bool = False,
                 use_kernel: bool = True):
        self.model = unwrap(model)
        self.use_kernel = use_kernel
        self.stop_after_last = stop_after_last
        self.config = (config or SignalConfig()).validate()
        self.block_bytes = int(block_bytes)
        text_config = getattr(self.model, "config", None)
        if text_config is None or not hasattr(text_config, "_attn_implementation"):
            raise cannot_capture(model, "it is not a transformers model")
        if hasattr(text_config, "get_text_config"):
            text_config = text_config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        self.layers = self.config.resolve_layers(self.num_layers)
        self.head_split = head_split
        self._modules = [m for m in self.model.modules() if hasattr(m, "layer_idx")
                         and "attention" in type(m).__name__.lower()]
        if not self._modules or not self.model._can_set_attn_implementation():
            raise cannot_capture(model, "its attention layers do not go through "
                                        "transformers' attention-function registry")
        check_capture_supported(self.model)
        # the configs the attention modules read their implementation from (a recompute
        # switches these to the capture for the duration of one layer)
        self._configs = list({id(m.config): m.config for m in self._modules
                              if hasattr(m, "config")}.values())
        self._ckpt_layers = _checkpointed_layers(self.model)
        self._pinned: list = []            # (layer, its own _gradient_checkpointing_func)
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._mask_plans: dict = {}
        self._plan = _ForwardPlan()
        self.paths: dict[int, str] = {}    # layer -> how its statistics were computed (PATHS)
        self.reasons: dict[int, str] = {}  # layer -> why that path
        self._logged: set = set()
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
            raise cannot_capture(self.model, "its attention implementation cannot be "
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
        self._unpin()
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)
            self._previous = None
        return False

    def _new_forward(self) -> None:
        self._stats.clear()
        self._mask_plans.clear()
        self.paths.clear()
        self.reasons.clear()
        self._plan = _ForwardPlan()
        self._pin()

    def _pin(self) -> None:
        """Wrap the checkpointing function of every checkpointed layer (idempotent)."""
        for layer in self._ckpt_layers:
            current = layer.__dict__.get("_gradient_checkpointing_func")
            if layer.gradient_checkpointing and current is not None \
                    and not isinstance(current, _PinningCheckpoint):
                layer._gradient_checkpointing_func = _PinningCheckpoint(current, self)
                self._pinned.append((layer, current))

    def _unpin(self) -> None:
        for layer, original in reversed(self._pinned):
            current = layer.__dict__.get("_gradient_checkpointing_func")
            if isinstance(current, _PinningCheckpoint) and current.capture is self:
                layer._gradient_checkpointing_func = original
        self._pinned.clear()

    def _unpinned_checkpoint(self) -> bool:
        """True when the model is checkpointed by means the capture has not wrapped (its
        recompute will run the model's own implementation); refused unless that is sdpa."""
        if _PINNED.get() or not self.model.training or not getattr(
                self.model, "is_gradient_checkpointing", False):
            return False
        if self._previous != "sdpa":
            raise cannot_capture(self.model, f"it is gradient-checkpointed by means other "
                                             f"than transformers' checkpointed layers, so its "
                                             f"recompute would run {self._previous!r} "
                                             "attention instead of the capture's sdpa; load "
                                             "it with attn_implementation='sdpa'")
        return True

    # -- recording (called from the attention function)
    def _record(self, module, query, key, value, attention_mask, kwargs):
        """Attention output of a sampled layer, recording its statistics once per forward.
        Checkpointed outside the capture's wrapping, the output stays sdpa's (what the
        model's own recompute runs)."""
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
        scaling = _scaling(query, kwargs)
        layer = module.layer_idx
        if layer in self._plan.outputs:  # the layer ran already in this forward
            return self._plan.replay(module, query, key, value, attention_mask, kwargs)
        unpinned = self._unpinned_checkpoint()
        lse = span = None
        fused = (self.use_kernel and not unpinned
                 and fused_available(query, key, value, kwargs))
        with torch.profiler.record_function(PROFILE_REGION):
            key_keep = self._mask_plan(attention_mask)
        if fused:
            with torch.profiler.record_function(PROFILE_REGION):
                output, lse, span = attention_with_lse(query, key, value, attention_mask,
                                                       scaling, key_keep)
            result = (output, None)
            self._plan.key_keep[layer] = key_keep
        else:
            result = _sdpa(module, query, key, value, attention_mask, kwargs)
        self._plan.outputs[layer] = "fused" if fused else "sdpa"
        with float32_math(query.device), torch.profiler.record_function(PROFILE_REGION):
            width = None if fused or not self.use_kernel else kernel_width(query)
            d = query.shape[-1]
            prepared = float32_qk(query, key, scaling, 0 if width is None else width - d)
            path = "fused" if fused else "blockwise"
            if width is not None:
                got = kernel_lse_and_span(prepared, d, attention_mask, key_keep)
                if got is not None:
                    (lse, span), path = got, "kernel"
            self._stats[layer] = layer_statistics(
                query, key, attention_mask, scaling, self._response, cfg.window, cfg.h_lo,
                cfg.h_hi, self.block_bytes, lse=lse, span=span, check_mask=False,
                prepared=prepared)
        self._note_path(layer, path, self._why(path, query, key, value, kwargs, unpinned,
                                               width))
        if self.stop_after_last and len(self._stats) == len(self.layers):
            raise _StopForward
        return result

    def _why(self, path, query, key, value, kwargs, unpinned, width) -> str:
        """Why a sampled layer took `path`, in words."""
        if path == "fused":
            return "CPU float32: output, log-sum-exp and span from one kernel call"
        if not self.use_kernel:
            return "use_kernel=False"
        if unpinned:
            keep = "gradient checkpointing outside transformers' layers keeps sdpa's output"
        elif query.device.type != "cpu":
            keep = f"{query.device.type} keeps sdpa's output"
        elif not query.dtype == key.dtype == value.dtype == torch.float32 \
                or torch.is_autocast_enabled("cpu"):
            keep = ("bfloat16 / autocast keeps sdpa's output (a bfloat16 value channel "
                    "cannot hold key positions)")
        else:
            keep = "dropout or an extra attention argument keeps sdpa's output"
        if path == "kernel":
            return keep + "; lse and span from one statistics kernel call"
        if width is None:
            return keep + f"; no statistics kernel on {query.device.type}"
        return keep + "; the statistics kernel takes only causal and padding masks here"

    def _note_path(self, layer: int, path: str, reason: str) -> None:
        self.paths[layer] = path
        self.reasons[layer] = reason
        if (path, reason) not in self._logged:
            self._logged.add((path, reason))
            logger.info("signal capture: %s path (%s)", path, reason)

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
                raise cannot_capture(self.model, "no sampled layer went through the capture "
                                                 "attention (was the forward run inside the "
                                                 "`with SignalCapture(...)` block?)")
            raise cannot_capture(self.model, f"layers {missing} did not go through the "
                                             "capture attention")
        stack = [torch.stack([self._stats[l][i] for l in self.layers], dim=1)
                 for i in range(3)]
        return HeadStats(waad=stack[0], fai_sum=stack[1], span=stack[2],
                         layers=list(self.layers))

    def token_signals(self, attention_mask: torch.Tensor | None = None,
                      response_mask: torch.Tensor | None = None) -> TokenSignals:
        """TokenSignals of the last forward. The masks, if given, are checked against the
        ones the forward was captured with."""
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


def compute_token_signals(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          response_mask: torch.Tensor, config: SignalConfig | None = None,
                          head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                          block_bytes: int = 8 << 20) -> TokenSignals:
    """TokenSignals of a batch in one call. input_ids (B, N); attention_mask (B, N) 1 =
    token (None: no padding); response_mask (B, N) True on response tokens. Runs a no_grad
    forward with the capture, stopped after the last sampled layer."""
    config = config or SignalConfig()
    capture = SignalCapture(model, config, response_mask=response_mask,
                            attention_mask=attention_mask, head_split=head_split,
                            block_bytes=block_bytes, stop_after_last=True)
    with torch.no_grad(), capture:
        capture.run(input_ids=input_ids, attention_mask=attention_mask)
    return capture.token_signals()
