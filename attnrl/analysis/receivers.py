"""Receiver heads of `attnrl analyze` against each head's positional profile, and repeated
sentences.

A head's vertical-score kurtosis (attnrl.signals.receiver, methods.md 5) is large when a few
sentences are read back by every later sentence, but also when every query reads a fixed
position: an attention sink on the first token, or a recency profile cut into sentences of
uneven length. Simulated on random causal attention (16 sentences, 20 responses): the top
mean kurtosis over 270 heads is about 1; with a +2 logit on the first token, 5.3-5.6, the
range at which real heads were read as "heavy-tailed receivers". So a head's kurtosis is compared
with the kurtosis its own positional profile gives:

- token profile u_r(s) (per head, response r, response position s): the mean attention
  that token s receives from the sentences >= proximity_ignore after its own, so that the
  vertical score of sentence j is the mean of u_r over j's tokens (`token_profile`);
- positional profile rho_{-r}(s): mean of u over the *other* responses at position s
  (leave-one-out, so a response's own receivers do not enter its expectation);
- positional kurtosis: the kurtosis of rho_{-r} averaged over r's own sentences; excess_r =
  kurtosis of r - positional kurtosis of r, on the sentences where both exist.

A sink is in rho at the same position as in u, so its excess is about 0 (simulated: <= 0);
a sentence read back because of what it says sits at a different position in every
response and is averaged away in rho. Claim (`receiver_claim`): a head is a receiver beyond
its positional profile when the simultaneous 95% lower bound over heads of its mean excess
exceeds RECEIVER_MARGIN (bootstrap over problems, max-T with fixed standard errors).

Repeated sentences: a response that repeats a sentence gives it as many vertical scores
(13 of the 20 GSM8K responses with >= 14 sentences had 1-21 repeats; 8 keep >= 14
distinct sentences); `unique_spans` keeps the first occurrence of each sentence text only,
before any kurtosis is computed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnrl.analysis.stats import bootstrap_counts, group_codes
from attnrl.errors import UserError
from attnrl.signals.receiver import kurtosis

# [D] excess kurtosis over the positional profile a head must clear (simultaneous lower
# bound). Simulated (270 heads, 14-38 sentences, 3 seeds; the generator of
# tests/attnrl/analysis/test_receivers.py): the best lower bound of random causal attention
# is at most 0.62 with 5 responses and 0.35 with 20, of a +2 / +4 first-token sink below 0;
# a planted receiver sentence reaches 1.8-23 (with a sink, 5 responses of 14-18 sentences:
# 0.2-6.0, so it can be missed there).
RECEIVER_MARGIN = 1.0
# [D] responses (with enough vertical scores) a claim needs: with 3, random attention
# reached a lower bound of 1.2 (a bootstrap over 3 responses has no tails to speak of).
MIN_RECEIVER_RESPONSES = 5


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def unique_spans(token_texts: list[str], spans: list[tuple[int, int]]):
    """Spans whose text (whitespace collapsed, lower case) did not occur in an earlier span
    of the same response, and the number of repeats dropped. Returns (spans, dropped)."""
    seen, kept = set(), []
    for start, end in spans:
        key = _normal("".join(token_texts[start:end]))
        if key not in seen:
            seen.add(key)
            kept.append((start, end))
    return kept, len(spans) - len(kept)


def sentence_index(spans, length: int) -> np.ndarray:
    """(length,) index of the span holding each position; -1 outside every span."""
    index = np.full(length, -1, dtype=np.int64)
    for i, (start, end) in enumerate(spans):
        index[start:end] = i
    return index


def profile_weights(spans, length: int, proximity_ignore: int = 4) -> torch.Tensor:
    """(S, length) float64: W[i, s] = 1 / #{i' >= j(s) + proximity_ignore} when sentence i
    counts for the token s of sentence j(s), else 0; u = sum_i W[i, s] * rows[i, s]."""
    S = len(spans)
    index = torch.from_numpy(sentence_index(spans, length))
    keep = (torch.arange(S)[:, None] >= torch.arange(S)[None, :] + proximity_ignore).double()
    count = keep.sum(0)                                                      # (S,) per j
    inside = index >= 0
    weights = torch.zeros(S, length, dtype=torch.float64)
    j = index[inside]
    weights[:, inside] = keep[:, j] / count[j].clamp(min=1)
    return weights


def token_profile(rows: torch.Tensor, spans, proximity_ignore: int = 4) -> torch.Tensor:
    """rows (..., S, N): rows[i, s] = mean attention of the tokens of sentence i (queries)
    to token s. Returns (..., N) u(s) (see the module docstring); NaN for tokens in no
    span or in a sentence without vertical score."""
    N = rows.shape[-1]
    weights = profile_weights(spans, N, proximity_ignore).to(rows.device, rows.dtype)
    u = (rows * weights).sum(-2)
    valid = weights.sum(0) > 0
    return torch.where(valid, u, torch.full_like(u, math.nan))


def span_means(profile: np.ndarray, spans) -> np.ndarray:
    """(..., N) -> (..., S) nan-mean of the profile over each span (NaN if none finite)."""
    out = np.full(profile.shape[:-1] + (len(spans),), math.nan)
    for i, (start, end) in enumerate(spans):
        block = profile[..., start:end]
        finite = np.isfinite(block)
        total = np.where(finite, block, 0.0).sum(-1)
        count = finite.sum(-1)
        out[..., i] = np.where(count > 0, total / np.maximum(count, 1), math.nan)
    return out


def _kurt(values: np.ndarray) -> np.ndarray:
    return kurtosis(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))).numpy()


def positional_excess(profiles: list[np.ndarray], spans: list, min_scores: int) -> dict:
    """Per response r and head: kurtosis of its vertical scores and of the leave-one-out
    positional profile over its sentences, on the sentences where both are finite (NaN
    with fewer than min_scores). profiles: per response (L, H, n_r) token profiles (NaN
    where none); spans: per response its spans. Returns (R, L, H) arrays 'kurtosis',
    'positional' and 'excess' (their difference)."""
    R = len(profiles)
    width = max(p.shape[-1] for p in profiles)
    stack = np.full((R,) + profiles[0].shape[:-1] + (width,), math.nan)
    for r, p in enumerate(profiles):
        stack[r, ..., :p.shape[-1]] = p
    finite = np.isfinite(stack)
    total, count = np.where(finite, stack, 0.0).sum(0), finite.sum(0)
    observed, expected = [], []
    for r in range(R):
        rest = count - finite[r]
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(rest > 0, (total - np.where(finite[r], stack[r], 0.0)) / rest,
                           math.nan)
        vert, vert0 = span_means(stack[r], spans[r]), span_means(rho, spans[r])
        both = np.isfinite(vert) & np.isfinite(vert0)
        enough = both.sum(-1) >= min_scores
        observed.append(np.where(enough, _kurt(np.where(both, vert, math.nan)), math.nan))
        expected.append(np.where(enough, _kurt(np.where(both, vert0, math.nan)), math.nan))
    observed, expected = np.stack(observed), np.stack(expected)
    return {"kurtosis": observed, "positional": expected, "excess": observed - expected}


def receiver_claim(excess: np.ndarray, groups=None, draws: int = 1000, seed: int = 0,
                   margin: float = RECEIVER_MARGIN,
                   min_responses: int = MIN_RECEIVER_RESPONSES) -> dict:
    """Simultaneous lower bounds of each head's mean excess (excess (R, ...) per response,
    NaN = not scored): bound_h = mean_h - q se_h, q = 95% quantile over bootstrap
    resamples of whole problems (groups (R,)) of max_h (mean*_h - mean_h) / se_h. Heads
    with bound > margin are receivers beyond their positional profile. Returns mean,
    lower (same shape as one response), the heads (index tuples) and 'measurable'."""
    excess = np.asarray(excess, dtype=float)
    R, shape = excess.shape[0], excess.shape[1:]
    flat = excess.reshape(R, -1)
    finite = np.isfinite(flat)
    scored = int(finite.any(1).sum())
    base = {"margin": margin, "min_responses": min_responses, "responses": scored}
    if scored < min_responses:
        return {**base, "measurable": False, "heads": []}
    values = np.where(finite, flat, 0.0)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, values.sum(0) / n, math.nan)
        var = np.where(n > 1, (np.where(finite, flat - mean, 0.0) ** 2).sum(0) / (n - 1),
                       math.nan)
        se = np.sqrt(var / n)
    codes = group_codes(groups, R)
    G = int(codes.max()) + 1
    per_group = np.zeros((G, flat.shape[1]))
    per_count = np.zeros((G, flat.shape[1]))
    np.add.at(per_group, codes, values)
    np.add.at(per_count, codes, finite.astype(float))
    counts = bootstrap_counts(G, draws, np.random.default_rng(seed)).astype(float)
    live = (n > 1) & (se > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (counts @ per_group[:, live]) / (counts @ per_count[:, live])
        dev = np.nanmax((boot - mean[live]) / se[live], axis=1) if live.any() \
            else np.zeros(draws)
    q = float(np.quantile(dev[np.isfinite(dev)], 0.95)) if np.isfinite(dev).any() else math.inf
    lower = np.full(flat.shape[1], math.nan)
    lower[live] = mean[live] - q * se[live]
    heads = [tuple(int(i) for i in np.unravel_index(h, shape))
             for h in np.argsort(-np.nan_to_num(lower, nan=-np.inf), kind="stable")
             if np.isfinite(lower[h]) and lower[h] > margin]
    return {**base, "measurable": True, "quantile": q, "mean": mean.reshape(shape),
            "lower": lower.reshape(shape), "heads": heads}


def check_profiles(profiles, spans) -> None:
    """UserError unless every profile is (L, H, n) with one spans list per profile."""
    if len(profiles) != len(spans):
        raise UserError(f"{len(profiles)} receiver profiles for {len(spans)} span lists")
    shapes = {tuple(np.shape(p)[:-1]) for p in profiles}
    if len(shapes) > 1:
        raise UserError(f"receiver profiles of different head grids: {sorted(shapes)}")
