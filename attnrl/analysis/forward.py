"""Batched full forwards of `attnrl analyze`: every per-head quantity the report needs from
one forward per batch, without an (N, N) attention map.

In one no-grad forward of a right-padded batch (prompt + response per row):
- the signal capture (attnrl.signals.capture) over *every* layer: per-head WAAD, FAI sums
  and span; the report's signals use the sampled layers, the head heat map all layers;
- `HeadRecorder`, a QK capture nested inside it, per layer and query head:
  * answer score r_{i,h}: mean over keys s <= a_i of q_a . k_s (a_i: the answer position of
    attnrl.signals.qk_select; the quantity qk_tokens / qk_consistency select heads by);
  * premise alignment: q_t . mean_{s in prompt} k_s per response token t (methods.md 2(a),
    the qk_premise credit signal);
  * receiver heads (methods.md 5) for rows with sentence spans: the mean attention of each
    sentence's tokens (queries) to every token, accumulated one query block at a time (a
    (B, H, rows, t1) block of one layer, never (N, N)); from it the sentence matrix M[i, j]
    (mean over tokens of sentence i and j of A_ts), the vertical-score kurtosis and the
    token profile of attnrl.analysis.receivers;
- the model's log-probability of each response token at temperature 1 (the QK paper's
  baseline), from the last hidden state at the response positions only. Always from this
  forward, never the rollout engine's values (those are after temperature and top-p), so
  sampled runs and `--responses` files share one baseline.

Right padding keeps every real row's causal keys real, so the recorder needs no mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attnrl.analysis.receivers import token_profile
from attnrl.signals.blocks import rows_per_block
from attnrl.signals.capture import SignalCapture
from attnrl.signals.qk import QKCapture, all_heads, mean_key_alignment
from attnrl.signals.qk_select import answer_positions
from attnrl.signals.receiver import kurtosis, vertical_scores


@dataclass
class Sample:
    """One response to analyse. `group`: its problem (responses of one prompt share it)."""

    prompt_ids: list[int]
    response_ids: list[int]
    group: int
    correct: bool
    reward: float = 0.0
    spans: list[tuple[int, int]] | None = None     # sentence spans in the response (receivers)
    text: str = ""
    repeated_sentences: int = 0   # repeats dropped from spans (attnrl.analysis.receivers)


@dataclass
class SampleResult:
    """Per-response results (numpy, response positions only unless stated)."""

    waad_heads: np.ndarray       # (L_all, H, n) per-head WAAD
    fai_heads: np.ndarray        # (L_all, H, n) per-head FAI sums (divide by counts)
    span: np.ndarray             # (L_all, H) mean attention distance over response tokens
    answer_score: np.ndarray     # (L_all, H) r_{i,h}
    premise: np.ndarray          # (L_all, H, n) q_t . mean prompt key
    logprobs: np.ndarray         # (n,) log p(token | prefix) at temperature 1
    receiver: np.ndarray | None  # (L_all, H) vertical-score kurtosis, or None
    receiver_profile: np.ndarray | None = None   # (L_all, H, n) token profile u, NaN = none
    extra: dict = field(default_factory=dict)   # answer_index, vertical_scores, spans


class HeadRecorder(QKCapture):
    """QK capture of every head of every layer recording the answer score, the premise
    alignment and (rows with spans) the receiver kurtosis; see the module docstring."""

    def __init__(self, model, answer: torch.Tensor, key_mask: torch.Tensor,
                 prompt_mask: torch.Tensor, spans: list, block_bytes: int = 32 << 20,
                 proximity_ignore: int = 4):
        super().__init__(model, all_heads(model), [0], [0])
        self.answer, self.key_mask, self.prompt_mask = answer, key_mask, prompt_mask
        self.spans, self.block_bytes, self.proximity_ignore = spans, block_bytes, proximity_ignore
        self.answer_score: dict[int, torch.Tensor] = {}
        self.premise: dict[int, torch.Tensor] = {}
        self.receiver: dict[int, list] = {}
        self._scaling = {}
        for module in model.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and \
                    type(module).__name__.endswith("Attention"):
                self._scaling[module.layer_idx] = getattr(module, "scaling", None)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
            q, k = query.detach().float(), key.detach().float()
            B, H, _, d = q.shape
            k_full = k.repeat_interleave(H // k.shape[1], dim=1)                 # (B, H, N, d)
            rows = torch.arange(B, device=q.device)
            q_a = q[rows, :, self.answer.clamp(min=0).to(q.device)]              # (B, H, d)
            scores = torch.einsum("bhd,bhnd->bhn", q_a, k_full)
            keys = self.key_mask.to(q.device).float()[:, None, :]
            self.answer_score[layer] = (scores * keys).sum(-1) / keys.sum(-1).clamp(min=1)
            self.premise[layer] = mean_key_alignment(q, k, self.prompt_mask)
            if any(s is not None for s in self.spans):
                scaling = self._scaling.get(layer) or d ** -0.5
                self.receiver[layer] = self._receiver(q, k_full, scaling)

    def _receiver(self, q, k, scaling) -> list:
        """Per row: ((H,) kurtosis of the vertical scores, (H, N) token profile u of
        attnrl.analysis.receivers), or None without spans."""
        B, H, N, _ = q.shape
        S = max(len(s) for s in self.spans if s is not None)
        avg = torch.zeros(B, S, N, device=q.device)
        for b, spans in enumerate(self.spans):
            for i, (start, end) in enumerate(spans or []):
                avg[b, i, start:end] = 1.0 / (end - start)
        rows = torch.zeros(B, H, S, N, device=q.device, dtype=torch.float64)   # sentence -> token
        bq = rows_per_block(self.block_bytes, B * H, N, N)
        for t0 in range(0, N, bq):
            t1 = min(N, t0 + bq)
            logits = torch.matmul(q[:, :, t0:t1] * scaling, k[:, :, :t1].transpose(-1, -2))
            causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=q.device).triu(t0 + 1)
            attn = logits.masked_fill_(causal, float("-inf")).softmax(-1)          # whole rows
            rows[..., :t1] += torch.matmul(avg[:, None, :, t0:t1], attn).double()
        matrix = torch.matmul(rows, avg[:, None].transpose(-1, -2).double())      # (B,H,S,S)
        out = []
        for b, spans in enumerate(self.spans):
            if spans is None:
                out.append(None)
                continue
            s = len(spans)
            vert = vertical_scores(matrix[b, :, :s, :s], self.proximity_ignore)
            profile = token_profile(rows[b, :, :s], spans, self.proximity_ignore)
            out.append((kurtosis(vert).float().cpu(), profile.float().cpu()))
        return out


def _batches(samples: list[Sample], max_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so a padded batch holds <= max_tokens."""
    order = sorted(range(len(samples)), key=lambda i: -(len(samples[i].prompt_ids)
                                                       + len(samples[i].response_ids)))
    batches, current, width = [], [], 0
    for i in order:
        n = len(samples[i].prompt_ids) + len(samples[i].response_ids)
        if current and max(width, n) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    if current:
        batches.append(current)
    return batches


def _response_logprobs(model, hidden, input_ids, response_mask, chunk: int = 256):
    """log p(token_t | prefix) at response positions, from the last hidden state.
    Returns (B, N) float32, 0 elsewhere."""
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    rows, cols = response_mask.nonzero(as_tuple=True)
    head = model.get_output_embeddings()
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        logits = head(hidden[r, c - 1]).float()
        out[r, c] = torch.log_softmax(logits, -1).gather(
            -1, input_ids[r, c][:, None].to(logits.device)).squeeze(-1).cpu()
    return out


@torch.no_grad()
def analyse_samples(model, samples: list[Sample], signal_config, eos_token_ids,
                    max_batch_tokens: int = 4096, progress=None) -> list[SampleResult]:
    """Run the batched forwards; results in the order of `samples`. `signal_config`: a
    SignalConfig whose layers are all layers (the caller subsets them)."""
    device = next(model.parameters()).device
    results: list[SampleResult | None] = [None] * len(samples)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    batches = _batches(samples, max_batch_tokens)
    for number, batch in enumerate(batches):
        items = [samples[i] for i in batch]
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in items)
        B = len(items)
        input_ids = torch.zeros(B, width, dtype=torch.long)
        attention = torch.zeros(B, width, dtype=torch.bool)
        response = torch.zeros(B, width, dtype=torch.bool)
        prompt = torch.zeros(B, width, dtype=torch.bool)
        spans = []
        for row, s in enumerate(items):
            p, n = len(s.prompt_ids), len(s.response_ids)
            input_ids[row, :p + n] = torch.tensor(s.prompt_ids + s.response_ids)
            attention[row, :p + n] = True
            prompt[row, :p] = True
            response[row, p:p + n] = True
            spans.append(None if s.spans is None else [(a + p, b + p) for a, b in s.spans])
        answer = answer_positions(input_ids, response, eos_token_ids)
        positions = torch.arange(width)
        key_mask = attention & (positions[None, :] <= answer[:, None])
        capture = SignalCapture(model, signal_config, response_mask=response,
                                attention_mask=attention)
        recorder = HeadRecorder(model, answer, key_mask, prompt, spans)
        with torch.no_grad(), capture, recorder:
            hidden = base(input_ids=input_ids.to(device),
                          attention_mask=attention.long().to(device),
                          use_cache=False).last_hidden_state
        stats = capture.head_stats()
        logprobs = _response_logprobs(model, hidden, input_ids, response)
        del hidden
        layers = sorted(recorder.answer_score)
        answer_score = torch.stack([recorder.answer_score[l] for l in layers], 1).cpu()
        premise = torch.stack([recorder.premise[l] for l in layers], 1).cpu()
        for row, (index, s) in enumerate(zip(batch, items)):
            p, n = len(s.prompt_ids), len(s.response_ids)
            sl = slice(p, p + n)
            receiver = profile = None
            extra = {"answer_index": int(answer[row]) - p}
            if s.spans is not None:
                receiver = torch.stack([recorder.receiver[l][row][0] for l in layers]).numpy()
                profile = torch.stack([recorder.receiver[l][row][1][:, sl]
                                       for l in layers]).numpy()
                extra["vertical_scores"] = max(0, len(s.spans) - recorder.proximity_ignore)
                extra["spans"] = [tuple(span) for span in s.spans]
            results[index] = SampleResult(
                waad_heads=stats.waad[row, :, :, sl].cpu().numpy(),
                fai_heads=stats.fai_sum[row, :, :, sl].cpu().numpy(),
                span=stats.span[row, :, :, sl].mean(-1).cpu().numpy(),
                answer_score=answer_score[row].numpy(),
                premise=premise[row, :, :, sl].numpy(), logprobs=logprobs[row, sl].numpy(),
                receiver=receiver, receiver_profile=profile, extra=extra)
        if progress is not None:
            progress(number + 1, len(batches))
    return results


def response_signals(results: list[SampleResult], layers: list[int], head_split, config,
                     prompt_lengths=None):
    """TokenSignals of responses from their per-head statistics, on `layers` (indices into
    the all-layer axis) with the given (local, global) split ((len(layers), H) bool): one
    (R, n_max) batch, response-only positions (position 0 = first response token)."""
    from attnrl.signals.aggregate import token_signals_from_head_stats
    from attnrl.signals.types import HeadStats

    n_max = max(r.waad_heads.shape[-1] for r in results)
    R, H = len(results), results[0].waad_heads.shape[1]
    L = len(layers)
    waad = torch.zeros(R, L, H, n_max)
    fai = torch.zeros(R, L, H, n_max)
    span = torch.zeros(R, L, H, n_max)
    mask = torch.zeros(R, n_max, dtype=torch.bool)
    for i, r in enumerate(results):
        n = r.waad_heads.shape[-1]
        waad[i, :, :, :n] = torch.from_numpy(r.waad_heads[layers])
        fai[i, :, :, :n] = torch.from_numpy(r.fai_heads[layers])
        span[i, :, :, :n] = torch.from_numpy(r.span[layers])[..., None]
        mask[i, :n] = True
    stats = HeadStats(waad=waad, fai_sum=fai, span=span, layers=list(layers))
    return token_signals_from_head_stats(stats, mask, config, head_split=head_split), mask


def pooled_span(results: list[SampleResult], rows=None) -> np.ndarray:
    """(L_all, H) token-weighted mean span over the responses `rows` (None: all), as the
    trainer pools a batch."""
    rows = range(len(results)) if rows is None else rows
    total, count = 0.0, 0
    for i in rows:
        n = results[i].waad_heads.shape[-1]
        total = total + results[i].span * n
        count += n
    return total / max(count, 1) if count else np.full_like(results[0].span, math.nan)
