"""Receiver heads (docs/methods.md section 5): heads whose attention concentrates, from all
later sentences, onto a few "broadcasting" sentences of the response.

Per response and head: split the response into sentences (token spans); sentence matrix
M[i, j] = mean of the attention block from the tokens of sentence i (queries) to those of
sentence j (keys); vertical score vert[j] = mean of M[i, j] over i >= j + proximity_ignore
(default 4; sentences with no such i are left out); the head's score is the kurtosis of
vert over j. Kurtosis here is Fisher's (excess: a normal sample gives 0) with the biased
population moments, m4 / m2^2 - 3, as scipy.stats.kurtosis(fisher=True, bias=True);
NaN when fewer than two sentences have a vertical score or when vert is constant.
Scores are averaged over responses (NaN-skipping) and the top 20 heads are receiver heads.

A kurtosis of a handful of values says nothing about tails: of 2 values it is always -2,
and of n values it cannot exceed n - 5 + 1 / (n - 1) (-1.5 for 3, 0.25 for 5, 5.1 for 10).
So a response is scored only with at least MIN_SENTENCE_SCORES vertical scores, i.e. at
least MIN_SENTENCE_SCORES + proximity_ignore sentences (14 with the default 4).

This is an analysis tool: it runs eager attention on one unpadded sequence at a time and
reduces each layer's (H, N, N) map to (H, S, S) right after that layer, so memory peaks at
one layer's map, not all layers'.
"""

from __future__ import annotations

import torch

from attnrl.errors import UserError

SENTENCE_END_CHARS = "!?\n"
MIN_SENTENCE_SCORES = 10      # vertical scores a response needs for its kurtosis to count


def min_sentences(proximity_ignore: int = 4, min_scores: int = MIN_SENTENCE_SCORES) -> int:
    """Sentences a response needs for `min_scores` vertical scores (S - proximity_ignore)."""
    return proximity_ignore + min_scores


def sentence_spans(token_texts: list[str]) -> list[tuple[int, int]]:
    """Split tokens into sentences: half-open [start, end) index spans covering all tokens.

    A sentence ends after a token whose text contains '!', '?', a newline, or a '.' that is
    not a decimal point (a '.' with a digit on both sides, looking across token borders).
    A span of whitespace / punctuation only (e.g. a blank line) joins the sentence before.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for i, text in enumerate(token_texts):
        if i + 1 < len(token_texts) and not _ends_sentence(token_texts, i):
            continue
        if spans and not any(c.isalnum() for c in "".join(token_texts[start:i + 1])):
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((start, i + 1))
        start = i + 1
    return spans


def _ends_sentence(texts: list[str], i: int) -> bool:
    text = texts[i]
    if any(c in text for c in SENTENCE_END_CHARS):
        return True
    for k, char in enumerate(text):
        if char != ".":
            continue
        before = text[k - 1] if k > 0 else (texts[i - 1][-1:] if i > 0 else "")
        nxt = texts[i + 1][:1] if i + 1 < len(texts) else ""
        after = text[k + 1] if k + 1 < len(text) else nxt
        if not (before.isdigit() and after.isdigit()):
            return True
    return False


def _averaging_matrix(spans: list[tuple[int, int]], length: int, dtype, device) -> torch.Tensor:
    """(S, N): row i holds 1/|span i| on the tokens of span i."""
    avg = torch.zeros(len(spans), length, dtype=dtype, device=device)
    for row, (start, end) in enumerate(spans):
        if not 0 <= start < end <= length:
            raise UserError(f"sentence span {(start, end)} is empty or outside 0..{length}")
        avg[row, start:end] = 1.0 / (end - start)
    return avg


def sentence_matrix(attention: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """attention (..., N, N) (rows = queries) -> (..., S, S) block means over the spans."""
    avg = _averaging_matrix(spans, attention.shape[-1], attention.dtype, attention.device)
    return avg @ attention @ avg.T


def vertical_scores(matrix: torch.Tensor, proximity_ignore: int = 4) -> torch.Tensor:
    """(..., S, S) -> (..., S): vert[j] = mean of M[i, j] over i >= j + proximity_ignore;
    NaN for sentences j with no such i."""
    if proximity_ignore < 0:
        raise UserError(f"proximity_ignore must be >= 0, got {proximity_ignore}")
    s = matrix.shape[-1]
    rows = torch.arange(s, device=matrix.device).unsqueeze(-1)
    cols = torch.arange(s, device=matrix.device).unsqueeze(0)
    keep = rows >= cols + proximity_ignore                          # (S, S)
    total = (matrix * keep).sum(-2)
    count = keep.sum(-2).to(matrix.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def kurtosis(values: torch.Tensor) -> torch.Tensor:
    """Fisher (excess) kurtosis over the last dim, biased moments, NaNs left out:
    m4 / m2^2 - 3. (..., n) -> (...); NaN if < 2 finite values or zero variance."""
    finite = torch.isfinite(values)
    n = finite.sum(-1).to(values.dtype)
    x = torch.where(finite, values, torch.zeros_like(values))
    mean = x.sum(-1, keepdim=True) / n.clamp(min=1).unsqueeze(-1)
    centred = torch.where(finite, values - mean, torch.zeros_like(values))
    m2 = centred.pow(2).sum(-1) / n.clamp(min=1)
    m4 = centred.pow(4).sum(-1) / n.clamp(min=1)
    tiny = torch.finfo(values.dtype).tiny ** 0.5
    out = m4 / m2.clamp(min=tiny) ** 2 - 3.0
    return torch.where((n >= 2) & (m2 > tiny), out, torch.full_like(out, float("nan")))


def head_kurtosis(attention: torch.Tensor, spans: list[tuple[int, int]],
                  proximity_ignore: int = 4) -> torch.Tensor:
    """attention (..., H, N, N) of one sequence -> (..., H) vertical-score kurtosis."""
    matrix = sentence_matrix(attention.double(), spans)
    return kurtosis(vertical_scores(matrix, proximity_ignore)).float()


def _attention_modules(model):
    return {m.layer_idx: m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
            and type(m).__name__.endswith("Attention")}


@torch.no_grad()
def receiver_kurtosis(model, input_ids: torch.Tensor, spans: list[tuple[int, int]],
                      layers: list[int] | None = None, proximity_ignore: int = 4) -> torch.Tensor:
    """Vertical-score kurtosis of every head of `layers` (None: all) for one sequence.

    input_ids: (N,) or (1, N), no padding. spans: sentence spans as input positions (add
    the prompt length to spans of the response). Returns (len(layers), H) float32.
    Runs eager attention for this forward and restores the model's implementation.
    """
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] != 1:
        raise UserError("receiver_kurtosis takes one sequence at a time (batch of 1)")
    if len(spans) < 2:
        raise UserError(f"need at least 2 sentences to score receiver heads, got {len(spans)}")
    modules = _attention_modules(model)
    layers = sorted(modules) if layers is None else list(layers)
    missing = [l for l in layers if l not in modules]
    if missing:
        raise UserError(f"layers {missing} not found (model has layers 0..{len(modules) - 1})")
    found: dict[int, torch.Tensor] = {}

    def reduce_layer(module, args, output):
        weights = output[1]                                        # (1, H, N, N)
        if weights is None:
            raise RuntimeError("eager attention returned no weights")
        found[module.layer_idx] = head_kurtosis(weights[0], spans, proximity_ignore)
        return (output[0], None) + tuple(output[2:])

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [modules[l].register_forward_hook(reduce_layer) for l in layers]
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return torch.stack([found[l] for l in layers]).cpu()


def select_receiver_heads(kurtoses: torch.Tensor, top_k: int = 20,
                          layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Top-k (layer, head) by kurtosis averaged over responses (NaN skipped).

    kurtoses: (R, L, H) (or a list of (L, H)); layers: the layer index of each of the L
    rows (None: 0..L-1). Heads with no finite kurtosis rank last; ties go to the earlier
    head.
    """
    stacked = torch.stack(list(kurtoses)) if not torch.is_tensor(kurtoses) else kurtoses
    if stacked.dim() != 3:
        raise UserError(f"kurtoses must be (responses, layers, heads), got {tuple(stacked.shape)}")
    n_layers, n_heads = stacked.shape[1:]
    layers = list(range(n_layers)) if layers is None else list(layers)
    if len(layers) != n_layers:
        raise UserError(f"{len(layers)} layer indices given for {n_layers} rows of kurtosis")
    if not 1 <= top_k <= n_layers * n_heads:
        raise UserError(f"top_k must be in 1..{n_layers * n_heads}, got {top_k}")
    mean = stacked.nanmean(0).flatten().nan_to_num(nan=float("-inf"))
    order = torch.sort(mean, descending=True, stable=True).indices[:top_k]
    return [(layers[int(i) // n_heads], int(i) % n_heads) for i in order]


def find_receiver_heads(model, tokenizer, sequences: list[tuple[list[int], list[int]]],
                        top_k: int = 20, layers: list[int] | None = None,
                        proximity_ignore: int = 4, min_scores: int = MIN_SENTENCE_SCORES,
                        ) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Receiver heads from (prompt_ids, response_ids) pairs: sentences are split in each
    response by `sentence_spans` on the decoded tokens. Responses with fewer than
    `min_scores` vertical scores (proximity_ignore + min_scores sentences) are skipped.
    Returns (heads, mean kurtosis (L, H))."""
    if min_scores < 2:
        raise UserError(f"min_scores must be >= 2 (a kurtosis needs 2 values), got {min_scores}")
    needed = min_sentences(proximity_ignore, min_scores)
    layers = sorted(_attention_modules(model)) if layers is None else list(layers)
    per_response = []
    for prompt_ids, response_ids in sequences:
        texts = [tokenizer.decode([t]) for t in response_ids]
        spans = [(a + len(prompt_ids), b + len(prompt_ids)) for a, b in sentence_spans(texts)]
        if len(spans) < needed:
            continue
        ids = torch.tensor(list(prompt_ids) + list(response_ids))
        per_response.append(receiver_kurtosis(model, ids, spans, layers, proximity_ignore))
    if not per_response:
        raise UserError(f"no response has at least {needed} sentences ({min_scores} vertical "
                        "scores); give longer responses")
    stacked = torch.stack(per_response)
    return select_receiver_heads(stacked, top_k, layers), stacked.nanmean(0)
