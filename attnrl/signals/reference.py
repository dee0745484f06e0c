"""Reference signals: the definitions of docs/methods.md sections 1.1-1.4 read literally off
the full (N, N) attention maps of an eager forward with output_attentions=True.

Slow and memory-hungry (O(L H N^2)) on purpose: plain code, loops where they make the
definition obvious. It is the oracle the fast capture is tested against. The choices where
the paper is silent are the same as in `attnrl.signals.aggregate` (see its docstring).
"""

from __future__ import annotations

import math

import torch

from attnrl.errors import UserError
from attnrl.signals.types import SignalConfig, TokenSignals


def attention_maps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: A (B, H, N, N) float32} from an eager forward with output_attentions=True.
    The model's attention implementation is switched to eager and restored."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise UserError(f"{type(model).__name__} returned no attention maps")
    return {l: out.attentions[l].float() for l in layers}


def padded_causal_mask(batch: int, n: int, pads, sliding: int | None = None):
    """A transformers-style (B, 1, n, n) bool mask, causal, with pads[b] left-padding keys
    and optionally a sliding window of `sliding` keys; and the (B, n) bool of real tokens."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        keep[b, :pad] = False
    t, s = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (s <= t) & keep[:, None, None, :]
    if sliding is not None:
        allowed &= t - s < sliding
    return allowed, keep


def distances(n: int) -> torch.Tensor:
    """(N, N) float: t - s below and on the diagonal, 0 above it."""
    t = torch.arange(n)[:, None]
    s = torch.arange(n)[None, :]
    return (t - s).clamp(min=0).float()


def span_per_query(attn: torch.Tensor) -> torch.Tensor:
    """sum_{s<=t} A_ts (t - s) for each query t. attn (B, H, N, N) -> (B, H, N)."""
    n = attn.shape[-1]
    causal = torch.ones(n, n).tril().bool()
    return (attn * distances(n).to(attn.dtype) * causal).sum(-1)


def head_span(attn: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """d^(h) = mean over response t of sum_{s<=t} A_ts (t - s). (B, H, N, N) -> (B, H);
    0 for a sequence without response tokens."""
    rows = span_per_query(attn)
    B, H = rows.shape[:2]
    out = torch.zeros(B, H)
    for b in range(B):
        ts = [t for t in range(rows.shape[-1]) if response_mask[b, t]]
        if ts:
            out[b] = rows[b][:, ts].mean(-1)
    return out


def split_heads(span: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads ranked by (span, index): the first c local, the last c global, with
    c = ceil(quantile * L * H) bounded to [1, L * H // 2] (1 head: c = 1)."""
    L, H = span.shape
    heads = [(l, h) for l in range(L) for h in range(H)]
    count = max(1, math.ceil(quantile * len(heads) - 1e-9))
    if len(heads) >= 2:
        count = min(count, len(heads) // 2)
    ranked = sorted(range(len(heads)), key=lambda i: (float(span.view(-1)[i]), i))
    local = torch.zeros(L, H, dtype=torch.bool)
    global_ = torch.zeros(L, H, dtype=torch.bool)
    for i in ranked[:count]:
        local[heads[i]] = True
    for i in ranked[len(heads) - count:]:
        global_[heads[i]] = True
    return local, global_


def waad(a_loc: torch.Tensor, window: int) -> torch.Tensor:
    """WAAD_t = sum_{s<=t} A^loc_ts min(t - s, W). a_loc (B, N, N) -> (B, N)."""
    n = a_loc.shape[-1]
    causal = torch.ones(n, n).tril().bool()
    return (a_loc * distances(n).clamp(max=window).to(a_loc.dtype) * causal).sum(-1)


def fai(a_glob: torch.Tensor, response_mask: torch.Tensor, h_lo: int, h_hi: int | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FAI_s = mean over t in T(s) of A^glob_ts, T(s) = {t in R: s + h_lo <= t <=
    min(N - 1, s + h_hi)}, for response keys s. a_glob (B, N, N) -> (fai, valid), (B, N);
    empty T(s): FAI 0 and not valid."""
    B, n = a_glob.shape[:2]
    out = torch.zeros(B, n)
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        for s in range(n):
            if not response_mask[b, s]:
                continue
            last = n - 1 if h_hi is None else min(n - 1, s + h_hi)
            ts = [t for t in range(s + h_lo, last + 1) if response_mask[b, t]]
            if ts:
                out[b, s] = a_glob[b, ts, s].mean()
                valid[b, s] = True
    return out, valid


def delta(waad_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Delta_t = |WAAD_t - WAAD_{t+1}| for response t whose next token is in the response,
    else 0. (B, N) -> (B, N)."""
    B, n = waad_values.shape
    out = torch.zeros(B, n)
    for b in range(B):
        for t in range(n - 1):
            if response_mask[b, t] and response_mask[b, t + 1]:
                out[b, t] = abs(float(waad_values[b, t]) - float(waad_values[b, t + 1]))
    return out


def top_q(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per row, the ceil(q * n_valid) largest values among valid positions (ties: earlier
    position first). (B, N) -> (B, N) bool."""
    out = torch.zeros(values.shape, dtype=torch.bool)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if valid[b, t]]
        count = math.ceil(q * len(idx) - 1e-9)
        for t in sorted(idx, key=lambda t: (-float(values[b, t]), t))[:count]:
            out[b, t] = True
    return out


def lower_median(values: list[float]) -> float:
    """The ((n - 1) // 2)-th smallest value; 0 for an empty list."""
    return sorted(values)[(len(values) - 1) // 2] if values else 0.0


def dominated_and_intro(anchor: torch.Tensor, waad_values: torch.Tensor,
                        delta_values: torch.Tensor, response_mask: torch.Tensor, k: int,
                        tau_waad: float | None, tau_delta: float | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors t with WAAD_t <= tau_waad and max_{u in t-k..t-1, u in R} Delta_u >=
    tau_delta, and their intro tokens argmax_u Delta_u (earliest on ties)."""
    B, n = anchor.shape
    dominated = torch.zeros(B, n, dtype=torch.bool)
    intro = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        resp = [t for t in range(n) if response_mask[b, t]]
        tw = tau_waad if tau_waad is not None else lower_median(
            [float(waad_values[b, t]) for t in resp])
        td = tau_delta if tau_delta is not None else lower_median(
            [float(delta_values[b, t]) for t in resp])
        for t in range(n):
            if not anchor[b, t]:
                continue
            back = [u for u in range(t - k, t) if u >= 0 and response_mask[b, u]]
            if not back:
                continue
            best = max(back, key=lambda u: (float(delta_values[b, u]), -u))
            if float(waad_values[b, t]) <= tw and float(delta_values[b, best]) >= td:
                dominated[b, t] = True
                intro[b, best] = True
    return dominated, intro


def reference_signals_from_maps(maps: torch.Tensor, response_mask: torch.Tensor,
                                config: SignalConfig, layers: list[int],
                                head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                                ) -> TokenSignals:
    """TokenSignals from full maps A (B, L, H, N, N) of the sampled layers."""
    response = response_mask.bool().cpu()
    maps = maps.float().cpu()
    spans = torch.stack([head_span(maps[:, i], response) for i in range(maps.shape[1])],
                        dim=1)                                           # (B, L, H)
    n_resp = response.sum(-1).float()
    if head_split is None:
        pooled = (spans * n_resp[:, None, None]).sum(0) / n_resp.sum()
        local, global_ = split_heads(pooled, config.head_quantile)
    else:
        local, global_ = (h.bool().cpu() for h in head_split)
    a_loc = maps[:, local].mean(1)                                      # (B, N, N)
    a_glob = maps[:, global_].mean(1)
    w = waad(a_loc, config.window) * response
    f, f_valid = fai(a_glob, response, config.h_lo, config.h_hi)
    d = delta(w, response)
    preplan = top_q(d if config.preplan_by == "delta" else w, response, config.q)
    anchor = top_q(f, f_valid, config.q)
    dominated, intro = dominated_and_intro(anchor, w, d, response, config.k,
                                           config.tau_waad, config.tau_delta)
    return TokenSignals(waad=w, fai=f, delta=d, fai_valid=f_valid, preplan_mask=preplan,
                        anchor_mask=anchor, dominated_mask=dominated, intro_mask=intro,
                        head_span=spans, local_heads=local, global_heads=global_,
                        layers=list(layers))


def reference_token_signals(model, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None, response_mask: torch.Tensor,
                            config: SignalConfig | None = None,
                            head_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                            ) -> TokenSignals:
    """TokenSignals from the full eager maps. Inputs as `compute_token_signals`."""
    config = (config or SignalConfig()).validate()
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    layers = config.resolve_layers(text.num_hidden_layers)
    maps = attention_maps(model, input_ids, attention_mask, layers)
    stacked = torch.stack([maps[l].cpu() for l in layers], dim=1)       # (B, L, H, N, N)
    del maps
    return reference_signals_from_maps(stacked, response_mask, config, layers, head_split)
