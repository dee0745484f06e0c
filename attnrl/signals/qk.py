"""QK-scores: raw query-key dot products inside chosen heads (docs/methods.md section 2).

S^(l,h)_{a,s} = q_a . k_s, with q and k taken after the rotary embedding, exactly as the
model's attention receives them (no 1/sqrt(d) scaling, no mask, no causality: a raw dot
product, so a key after the query is scored too). With GQA, query head h reads key head
h // (H / H_kv), as in the model.

How Q and K are captured: an attention function registered with transformers'
`AttentionInterface` (plus a mask function under the same name in
`AttentionMaskInterface`, so the padding mask still reaches every layer) records the
needed dot products and then runs the attention the model had (sdpa when it was eager;
another registered capture, such as the signal capture, keeps running inside it, so
QK-scores can come from the same forward as WAAD / FAI). This sees the very tensors
the model attends with, whatever the architecture does before attention (q/k norms,
partial or scaled rotary, biases), which re-applying rotary to hooked q_proj / k_proj
outputs would have to re-implement per model. The model's attention implementation is
switched for the duration of the capture and restored afterwards.

Head selection (`select_heads_by_auc`): rank heads by the AUC with which their score
separates labelled examples (e.g. rollout correctness), Mann-Whitney with ties as 1/2.
"""

from __future__ import annotations

import torch

from attnrl.errors import UserError

CAPTURE_NAME = "attnrl_qk_capture"
_SINK_ATTR = "_attnrl_qk_sink"

HeadRef = tuple[int, int]  # (layer index, query-head index)


class _StopForward(Exception):
    """Raised after the last needed layer when the rest of the forward is not needed."""


def _capture_name(previous: str | None) -> str:
    """Register (once) and return the capture's attention-function name for a model whose
    implementation was `previous`: it records, then runs `previous` with `previous`'s mask
    function. 'eager' and names without a registered function / mask run as sdpa. So a
    capture nests inside another registered capture (e.g. the signal capture): both run."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = previous if (previous in ALL_ATTENTION_FUNCTIONS.valid_keys()
                        and previous in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()) else "sdpa"
    name = f"{CAPTURE_NAME}__{base}"
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name
    delegate = ALL_ATTENTION_FUNCTIONS[base]

    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        sink = getattr(module, _SINK_ATTR, None)
        if sink is not None:
            sink.record(module.layer_idx, query, key)
        return delegate(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, capture_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def all_heads(model, layers: list[int] | None = None) -> list[HeadRef]:
    """Every (layer, head) of `layers` (None: all layers), layer-major: the head order
    `qk_scores` uses when `heads` is None."""
    config = _text_config(model)
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range for a model with {n_layers} layers "
                        f"(valid 0..{n_layers - 1})")
    return [(l, h) for l in layers for h in range(n_heads)]


def _check_heads(model, heads) -> list[HeadRef]:
    config = _text_config(model)
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    heads = [(int(l), int(h)) for l, h in heads]
    bad = [(l, h) for l, h in heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise UserError(f"heads {bad} out of range: the model has {n_layers} layers of "
                        f"{n_heads} query heads; give (layer, head) pairs in those ranges")
    if not heads:
        raise UserError("no heads given: pass at least one (layer, head) pair")
    return heads


def mask_to_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask -> (B, M) long positions of its True entries, in order, padded
    with -1 to the largest row count M."""
    mask = mask.bool()
    counts = mask.sum(-1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    slot = torch.arange(width, device=mask.device).unsqueeze(0)
    return torch.where(slot < counts.unsqueeze(-1), order, torch.full_like(order, -1))


def _positions(pos, batch: int, length: int, attention_mask, what: str) -> torch.Tensor:
    pos = torch.as_tensor(pos, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0).expand(batch, -1)
    if pos.dim() != 2 or pos.shape[0] != batch:
        raise UserError(f"{what} must have shape (P,) or (B={batch}, P), got {tuple(pos.shape)}")
    if ((pos < -1) | (pos >= length)).any():
        raise UserError(f"{what} must lie in 0..{length - 1} (or -1 for 'none'), got "
                        f"values {pos.min().item()}..{pos.max().item()}")
    if attention_mask is not None:  # a position on padding counts as 'none'
        on_pad = ~attention_mask.bool().to(pos.device).gather(1, pos.clamp(min=0))
        pos = pos.masked_fill(on_pad, -1)
    return pos.contiguous()


def _checkpointed(model) -> bool:
    """True when a training forward of `model` will be recomputed by gradient
    checkpointing (transformers' checkpointing layers, what TRL turns on)."""
    if not model.training:
        return False
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return False
    return any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
               for m in model.modules())


class QKCapture:
    """Context manager recording S = q_a . k_s for `heads` during one forward of `model`.

    query_positions: (Q,) or (B, Q) long; key_positions: (K,) or (B, K) long; -1 = none.
    After the forward, `scores` is (B, n_heads, Q, K) float32 in the order of `heads`, NaN
    where a position is -1. The forward's outputs are those of sdpa attention.
    """

    def __init__(self, model, heads: list[HeadRef], query_positions, key_positions,
                 stop_after_last: bool = False):
        from attnrl.signals.capture import check_capture_supported

        check_capture_supported(model)  # softcapping / sinks: the forward runs sdpa
        self.model = model
        self.heads = _check_heads(model, heads)
        self.query_positions = torch.as_tensor(query_positions, dtype=torch.long)
        self.key_positions = torch.as_tensor(key_positions, dtype=torch.long)
        self.stop_after_last = stop_after_last
        self.scores: torch.Tensor | None = None
        self._by_layer: dict[int, list[tuple[int, int]]] = {}
        for slot, (layer, head) in enumerate(self.heads):
            self._by_layer.setdefault(layer, []).append((slot, head))
        self._pending: set[int] = set()

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """query (B, H, N, d), key (B, H_kv, N, d): called from the attention function."""
        if layer not in self._by_layer:
            return
        batch, n_heads, length, dim = query.shape
        if key.shape[2] != length:
            raise UserError("QK capture needs a full forward without a KV cache "
                            f"(got {length} queries for {key.shape[2]} keys)")
        qpos = self.query_positions.to(query.device)
        kpos = self.key_positions.to(query.device)
        qpos = qpos.unsqueeze(0).expand(batch, -1) if qpos.dim() == 1 else qpos
        kpos = kpos.unsqueeze(0).expand(batch, -1) if kpos.dim() == 1 else kpos
        if self.scores is None:
            self.scores = torch.full((batch, len(self.heads), qpos.shape[1], kpos.shape[1]),
                                     float("nan"), dtype=torch.float32, device=query.device)
        slots = torch.tensor([s for s, _ in self._by_layer[layer]], device=query.device)
        q_heads = torch.tensor([h for _, h in self._by_layer[layer]], device=query.device)
        kv_heads = q_heads // (n_heads // key.shape[1])
        # float32 even inside a mixed-precision forward (e.g. a trainer's bf16 autocast)
        with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
            q = query.detach()[:, q_heads].float()            # (B, h, N, d)
            k = key.detach()[:, kv_heads].float()             # (B, h, N, d)
            q = q.gather(2, qpos.clamp(min=0)[:, None, :, None].expand(-1, len(q_heads), -1, dim))
            k = k.gather(2, kpos.clamp(min=0)[:, None, :, None].expand(-1, len(q_heads), -1, dim))
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
            none = (qpos < 0)[:, None, :, None] | (kpos < 0)[:, None, None, :]
            self.scores[:, slots] = s.masked_fill(none, float("nan"))
        self._pending.discard(layer)
        if self.stop_after_last and not self._pending:
            raise _StopForward

    def __enter__(self):
        self._previous = _text_config(self.model)._attn_implementation
        name = _capture_name(self._previous)
        if not name.endswith(f"__{self._previous}") and _checkpointed(self.model):
            raise UserError(
                f"QK capture on a model loaded with attn_implementation {self._previous!r} "
                "under gradient checkpointing: the capture's forward runs sdpa but the "
                "recompute would run the model's own attention with another mask; load the "
                "model with attn_implementation='sdpa', or turn gradient checkpointing off")
        self._pending = set(self._by_layer)
        self.scores = None
        self._modules = [m for m in self.model.modules()
                         if getattr(m, "layer_idx", None) in self._by_layer
                         and type(m).__name__.endswith("Attention")]
        for module in self._modules:
            setattr(module, _SINK_ATTR, self)
        self.model.set_attn_implementation(name)
        return self

    def __exit__(self, *exc) -> bool:
        for module in self._modules:
            if getattr(module, _SINK_ATTR, None) is self:
                delattr(module, _SINK_ATTR)
        self.model.set_attn_implementation(self._previous)
        return False


class PremiseQKCapture(QKCapture):
    """The answer-query capture plus, for `qk_premise`, each query's alignment with the
    mean prompt key per candidate head (`premise`, (B, H, N)), from the same forward."""

    def __init__(self, model, heads, query_positions, key_positions, prompt_mask):
        super().__init__(model, heads, query_positions, key_positions)
        self.prompt_mask = prompt_mask
        self.premise: torch.Tensor | None = None

    def record(self, layer, query, key):
        if layer in self._by_layer:
            slots = [s for s, _ in self._by_layer[layer]]
            q_heads = torch.tensor([h for _, h in self._by_layer[layer]])
            values = mean_key_alignment(query, key, self.prompt_mask, q_heads)
            if self.premise is None:
                self.premise = torch.zeros(query.shape[0], len(self.heads), query.shape[2],
                                           device=query.device)
            self.premise[:, slots] = values
        super().record(layer, query, key)


def qk_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              query_positions, key_positions, heads: list[HeadRef] | None = None,
              layers: list[int] | None = None) -> torch.Tensor:
    """Raw QK-scores of one batch, without gradient.

    input_ids, attention_mask: (B, N) (any padding side). query_positions: (Q,) or (B, Q),
    key_positions: (K,) or (B, K), long, -1 = none. heads: (layer, head) pairs; None = all
    heads of `layers` (None: all layers) in the order of `all_heads(model, layers)`.
    Returns (B, n_heads, Q, K) float32, NaN where a position is -1 or falls on padding
    (attention_mask == 0). The forward stops after the last needed layer.
    """
    heads = all_heads(model, layers) if heads is None else heads
    batch, length = input_ids.shape
    qpos = _positions(query_positions, batch, length, attention_mask, "query_positions")
    kpos = _positions(key_positions, batch, length, attention_mask, "key_positions")
    device = next(model.parameters()).device
    capture = QKCapture(model, heads, qpos, kpos, stop_after_last=True)
    with torch.no_grad(), capture:
        try:
            model(input_ids=input_ids.to(device),
                  attention_mask=None if attention_mask is None else attention_mask.to(device),
                  use_cache=False)
        except _StopForward:
            pass
    if capture.scores is None or capture._pending:
        raise RuntimeError(f"layers {sorted(capture._pending)} were never reached: this model's "
                           "attention does not go through transformers' AttentionInterface")
    return capture.scores


def premise_alignment(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      prompt_mask: torch.Tensor, response_mask: torch.Tensor,
                      heads: list[HeadRef], reduce: str = "mean") -> torch.Tensor:
    """Per-token alignment of each response token with the prompt (premise) keys.

    prompt_mask, response_mask: (B, N) bool. For response token t and head (l, h):
    reduce over prompt keys s of q_t . k_s ('mean' or 'max'). Returns (B, n_heads, N)
    float32, 0 outside the response.
    """
    if reduce not in ("mean", "max"):
        raise UserError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    prompt_mask, response_mask = prompt_mask.bool(), response_mask.bool()
    if (prompt_mask.sum(-1) == 0).any():
        raise UserError("premise_alignment: a row has no prompt tokens in prompt_mask")
    qpos, kpos = mask_to_positions(response_mask), mask_to_positions(prompt_mask)
    scores = qk_scores(model, input_ids, attention_mask, qpos, kpos, heads=heads)
    if reduce == "mean":
        per_query = scores.nanmean(-1)
    else:
        per_query = scores.nan_to_num(nan=float("-inf")).amax(-1)
    out = torch.zeros(scores.shape[0], scores.shape[1], input_ids.shape[1],
                      dtype=torch.float32, device=scores.device)
    valid = qpos >= 0
    rows, slots = valid.nonzero(as_tuple=True)
    out[rows, :, qpos[rows, slots]] = per_query[rows, :, slots]
    return out


def mean_key_alignment(query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor,
                       q_heads: torch.Tensor | None = None) -> torch.Tensor:
    """Per query position t and head h: mean over keys s in `key_mask` of q_t . k_s, as
    q_t . (mean_s k_s) (the dot product is linear in k: no (N, K) score matrix).

    query (B, H, N, d), key (B, H_kv, N, d) as the attention receives them; key_mask (B, N)
    bool (a row without keys gives 0); q_heads: query-head indices (None: all). Returns
    (B, len(q_heads), N) float32. With key_mask = the prompt, this is the 'mean' premise
    alignment of `premise_alignment`.
    """
    n_heads = query.shape[1]
    q_heads = torch.arange(n_heads, device=query.device) if q_heads is None else \
        q_heads.to(query.device)
    kv_heads = q_heads // (n_heads // key.shape[1])
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        weights = key_mask.to(query.device, torch.float32)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)           # (B, N)
        k_mean = torch.einsum("bn,bhnd->bhd", weights, key.detach().float())      # (B, Hkv, d)
        return torch.einsum("bhnd,bhd->bhn", query.detach()[:, q_heads].float(),
                            k_mean[:, kv_heads])


# ----------------------------------------------------------------------- head selection

def auc_per_head(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUC of each column of `scores` (n_examples, n_heads) for bool `labels` (n_examples,):
    P(score of a positive > score of a negative) + 1/2 P(tie), via average ranks
    (Mann-Whitney U / (n_pos n_neg)). Returns (n_heads,) float64."""
    scores = torch.as_tensor(scores).double()
    labels = torch.as_tensor(labels).bool()
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise UserError(f"scores must be (n_examples, n_heads) and labels (n_examples,); got "
                        f"{tuple(scores.shape)} and {tuple(labels.shape)}")
    if torch.isnan(scores).any():
        raise UserError("scores contain NaN: drop examples without a score before ranking heads")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"AUC needs both labels: got {n_pos} positive and {n_neg} negative "
                        "examples; add examples of the missing class")
    columns = scores.T.contiguous()                                   # (H, n)
    ordered = torch.sort(columns, dim=-1).values
    below = torch.searchsorted(ordered, columns, right=False)         # count < x
    upto = torch.searchsorted(ordered, columns, right=True)           # count <= x
    avg_rank = (below + upto + 1).double() / 2                        # 1-based, ties averaged
    rank_sum = avg_rank[:, labels].sum(-1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def select_heads_by_auc(scores: torch.Tensor, labels: torch.Tensor, top_k: int,
                        symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k heads by how well their score separates labels (e.g. correct rollouts).

    scores (n_examples, n_heads), labels (n_examples,) bool. symmetric=False ranks by AUC
    (high score = positive); symmetric=True ranks by |AUC - 0.5|, so a head whose score is
    low on positives counts as well. Ties in the ranking go to the lower head index.
    Returns (indices (top_k,) long, aucs (n_heads,) float64: the raw AUC of every head).
    """
    aucs = auc_per_head(scores, labels)
    if not 1 <= top_k <= aucs.numel():
        raise UserError(f"top_k must be in 1..{aucs.numel()} (the number of heads), got {top_k}")
    key = (aucs - 0.5).abs() if symmetric else aucs
    order = torch.sort(key, descending=True, stable=True).indices
    return order[:top_k], aucs
