"""From per-response forward results to every number of the analysis report (a JSON-able
dict). Sections: coupling, heads, outcome, qk, qk_premise, receivers.

Choices where the method is silent:
- The local / global split is pooled over all responses (token-weighted span, as the
  trainer pools one batch), on the sampled layers; per-layer coupling splits each layer's
  own heads with the same quantile.
- Peaks: top p of WAAD and of Delta among response tokens, of FAI among tokens with a
  non-empty future window; 'FAI peak follows a source peak' = a source peak at 0..k tokens
  before it (attnrl.analysis.coupling: the cross-response null gives the verdict; uniform
  and structured nulls are secondary figures).
- Per layer: every layer's coupling against the same cross pairings (the eligible FAI
  positions do not depend on the layer), and a family-wise p of the maximum over layers
  (max-T over the standardized couplings, attnrl.analysis.coupling.max_over_family).
- QK heads: AUC within problems (primary) and across problems (attnrl.analysis.auc); heads
  are selected by within-problem AUC with high score = correct (the rule of qk_tokens /
  qk_consistency) on half of the problems and tested on the other half, against two
  baselines: the model's mean log-prob of the response at temperature 1 (from the analysis
  forward, in both modes) and the response length in tokens.
- Receiver heads: only responses with >= MIN_SENTENCE_SCORES vertical scores (distinct
  sentences); ranked by kurtosis as the trainer does, claimed only beyond each head's
  positional profile (attnrl.analysis.receivers).
- QK held-out verdict: exact permutation test on the held-out half, and only with
  auc.MIN_HELD_OUT_PROBLEMS held-out problems with both outcomes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from attnrl.analysis import auc, stats
from attnrl.analysis.coupling import (
    PAIR_POOL,
    POSITION_BINS,
    coupling,
    max_over_family,
    peak_mask,
)
from attnrl.analysis.forward import pooled_span, response_signals
from attnrl.analysis.receivers import check_profiles, positional_excess, receiver_claim
from attnrl.errors import UserError
from attnrl.signals.aggregate import select_heads, token_sets
from attnrl.signals.receiver import MIN_SENTENCE_SCORES, select_receiver_heads

LAYER_KEYS = ("observed", "observed_ci", "chance", "ratio", "ratio_ci", "excess", "excess_ci",
              "p_value")


def _heads_list(mask: torch.Tensor, layers: list[int]) -> list[list[int]]:
    return [[layers[l], h] for l, h in mask.nonzero().tolist()]


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, int(a.sum()))


def head_section(results, groups, sampled: list[int], quantile: float, seed: int) -> dict:
    span = pooled_span(results)                                          # (L_all, H)
    local, global_ = select_heads(torch.from_numpy(span[sampled]), quantile)
    first, second = stats.split_groups(groups, len(results), seed)
    split_a = select_heads(torch.from_numpy(pooled_span(results, first)[sampled]), quantile)
    split_b = select_heads(torch.from_numpy(pooled_span(results, second)[sampled]), quantile)
    return {"span": span.tolist(), "sampled_layers": sampled, "quantile": quantile,
            "local_heads": _heads_list(local, sampled),
            "global_heads": _heads_list(global_, sampled),
            "local_span_range": [float(span[sampled][local.numpy()].min()),
                                 float(span[sampled][local.numpy()].max())],
            "global_span_range": [float(span[sampled][global_.numpy()].min()),
                                  float(span[sampled][global_.numpy()].max())],
            "stability": {"halves_responses": [int(first.size), int(second.size)],
                          "local_overlap": _overlap(split_a[0], split_b[0]),
                          "global_overlap": _overlap(split_a[1], split_b[1]),
                          "local_a": _heads_list(split_a[0], sampled),
                          "local_b": _heads_list(split_b[0], sampled),
                          "global_a": _heads_list(split_a[1], sampled),
                          "global_b": _heads_list(split_b[1], sampled)},
            "_split": (local, global_)}


def peaks(signals, mask, p: float):
    return {"waad": peak_mask(signals.waad, mask, p),
            "delta": peak_mask(signals.delta, mask, p),
            "fai": peak_mask(signals.fai, signals.fai_valid, p)}


def coupling_section(results, groups, sampled, split, config, p, k, permutations, bootstrap,
                     seed, n_layers, quantile, bins=POSITION_BINS, pool=PAIR_POOL):
    signals, mask = response_signals(results, sampled, split, config)
    top = peaks(signals, mask, p)
    out = {"p": p, "k": k, "bins": bins, "pool": pool}
    for source in ("waad", "delta"):
        out[f"fai_after_{source}"] = coupling(
            top["fai"], top[source], signals.fai_valid, k, permutations, bootstrap, seed, groups,
            bins, pool)
    # the trainer's own sets (top q): anchors after preplan tokens, preplan_by delta / waad
    by = {}
    for rank_by in ("delta", "waad"):
        cfg = _replace(config, preplan_by=rank_by)
        _, preplan, anchor, _, _ = token_sets(signals.waad, signals.fai, signals.fai_valid,
                                              mask, cfg)
        by[rank_by] = coupling(anchor, preplan, signals.fai_valid, k, permutations, bootstrap,
                               seed, groups, bins, pool)
    out["anchors_after_preplan_by"] = by
    out["per_layer"] = per_layer_coupling(results, groups, config, p, k,
                                          max(1000, permutations // 5),
                                          max(200, bootstrap // 5), seed, n_layers, quantile,
                                          bins, pool)
    return out, signals, mask


def per_layer_coupling(results, groups, config, p, k, permutations, bootstrap, seed,
                       n_layers, quantile, bins=POSITION_BINS, pool=PAIR_POOL) -> list[dict]:
    """FAI after WAAD / Delta peaks of each layer alone (its own local / global split), all
    against the same cross pairings; 'p_max_layers': family-wise p of the maximum over
    the layers (max-T, per source)."""
    rows, nulls, partners = [], {"waad": [], "delta": []}, {}
    all_spans = pooled_span(results)
    for layer in range(n_layers):
        layer_split = select_heads(torch.from_numpy(all_spans[[layer]]), quantile)
        sig, m = response_signals(results, [layer], layer_split, config)
        t = peaks(sig, m, p)
        row = {"layer": layer}
        for source in ("waad", "delta"):
            c = coupling(t["fai"], t[source], sig.fai_valid, k, permutations, bootstrap, seed,
                         groups, bins, pool, partners=partners.get(source), keep_null=True)
            partners[source] = c.pop("_partners")
            nulls[source].append(c.pop("_null"))
            row[source] = {key: c[key] for key in LAYER_KEYS}
        rows.append(row)
    for source, null in nulls.items():
        observed = [row[source]["observed"] for row in rows]
        for row, p_max in zip(rows, max_over_family(observed, np.stack(null))):
            row[source]["p_max_layers"] = float(p_max)
    return rows


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def outcome_section(signals, mask, labels, groups, seed) -> dict:
    n = mask.sum(-1).clamp(min=1).float()
    valid = signals.fai_valid
    per_response = {
        "waad_mean": (signals.waad * mask).sum(-1) / n,
        "fai_mean": (signals.fai * valid).sum(-1) / valid.sum(-1).clamp(min=1),
        "delta_mean": (signals.delta * mask).sum(-1) / n,
        "length_tokens": mask.sum(-1).float(),
    }
    pos = torch.arange(mask.shape[1])[None, :].float() / n[:, None]
    anchors = signals.anchor_mask
    per_response["anchor_relative_position"] = (pos * anchors).sum(-1) / \
        anchors.sum(-1).clamp(min=1)
    per_response["dominated_fraction"] = signals.dominated_mask.sum(-1) / \
        anchors.sum(-1).clamp(min=1)
    out = {name: stats.compare_means(v.numpy(), labels, groups, seed=seed)
           for name, v in per_response.items()}
    bins = np.linspace(0, 1, 11)
    hist = {}
    for name, rows in (("correct", labels), ("incorrect", ~labels)):
        rel = pos[torch.from_numpy(rows)][anchors[torch.from_numpy(rows)]].numpy()
        counts, _ = np.histogram(np.clip(rel, 0, 1 - 1e-9), bins)
        hist[name] = (counts / max(1, counts.sum())).tolist()
    out["anchor_position_histogram"] = {"bins": bins.tolist(), **hist}
    return out


def _attempt(compute, *args, **kwargs):
    """compute(...), or {'skipped': reason} when the data cannot answer it (UserError)."""
    try:
        return compute(*args, **kwargs)
    except UserError as err:
        return {"skipped": str(err)}


NULLS = (("within", "within"), ("across", "block"))      # report key, auc_permutation null
NULL_TEXT = {"within": "labels permuted within problems",
             "block": "whole problems' label vectors permuted across problems of one size"}


def _auc_test(scores, labels, groups, permutations, rng, null, n_heads=None) -> dict:
    """auc_permutation as (layer, head) grids with the best head (n_heads given), or as
    scalars (one column)."""
    result = auc.auc_permutation(scores, labels, groups, permutations, rng, null)
    extra = {key: result[key] for key in ("mixed_problems", "pairs") if key in result}
    if n_heads is None:
        return {"auc": result["auc"][0], "p": result["p"][0], "null": NULL_TEXT[null], **extra}
    heads = [[i // n_heads, i % n_heads] for i in range(len(result["auc"]))]
    grid = {key: np.array(result[key]).reshape(-1, n_heads).tolist()
            for key in ("auc", "p", "p_fwer")}
    best = int(np.argmax(np.abs(np.array(result["auc"]) - 0.5)))
    return {**grid, "null": NULL_TEXT[null], **extra, "best_head": heads[best],
            "best_auc": result["auc"][best], "best_p_fwer": result["p_fwer"][best],
            "significant_heads_fwer_0.05": [heads[i] for i, p in enumerate(result["p_fwer"])
                                            if p < 0.05]}


def qk_section(results, labels, groups, n_heads, top_k, permutations, draws, seed) -> dict:
    """QK answer-score AUCs: within problems (primary), across problems (block null), the
    held-out selection with its baselines (T = 1 mean log-prob, length)."""
    scores = np.stack([r.answer_score.reshape(-1) for r in results])        # (R, L*H)
    baselines = {"logprob": np.array([float(np.mean(r.logprobs)) for r in results]),
                 "length": np.array([float(r.waad_heads.shape[-1]) for r in results])}
    rng = np.random.default_rng(seed)
    out = {"permutations": permutations, "top_k": top_k}
    for key, null in NULLS:
        out[key] = _attempt(_auc_test, scores, labels, groups, permutations, rng, null, n_heads)
    out["baselines"] = {name: {key: _attempt(_auc_test, values, labels, groups, permutations,
                                             rng, null) for key, null in NULLS}
                        for name, values in baselines.items()}
    held = _attempt(auc.held_out_selection, scores, labels, top_k, groups, seed, draws,
                    baselines=baselines, permutations=permutations)
    if "selected" in held:
        held["selected"] = [[i // n_heads, i % n_heads] for i in held["selected"]]
    out["held_out"] = held
    across = np.array(auc.auc_columns(scores, labels))
    out["_order"] = np.argsort(-across, kind="stable")       # the trainer's rule (all pairs)
    return out


def premise_section(results, signals, mask, labels, groups, qk, n_heads, q, k, seed,
                    permutations, draws, bins=POSITION_BINS, pool=PAIR_POOL) -> dict:
    """qk_premise: the response tokens most aligned with the prompt keys on the QK heads
    (top-k by AUC over all responses, the trainer's rule): do they coincide with anchors /
    preplan tokens (k = 0: the same token), and does the response-mean alignment predict
    correctness (heads chosen by within-problem AUC on the selection half; their mean
    z-scored alignment's within-problem AUC on the held-out half)?"""
    chosen = qk["_order"][:qk["top_k"]]
    per_token = torch.zeros(mask.shape)
    for i, r in enumerate(results):
        flat = r.premise.reshape(-1, r.premise.shape[-1])
        per_token[i, :flat.shape[1]] = torch.from_numpy(flat[chosen].mean(0))
    top = peak_mask(per_token, mask, q)
    out = {"heads": [[int(i) // n_heads, int(i) % n_heads] for i in chosen], "q": q}
    out["anchors"] = coupling(top, signals.anchor_mask, mask, 0, permutations, draws, seed,
                              groups, bins, pool)
    out["preplan"] = coupling(top, signals.preplan_mask, mask, 0, permutations, draws, seed,
                              groups, bins, pool)
    means = np.stack([r.premise.reshape(-1, r.premise.shape[-1]).mean(-1) for r in results])
    held = _attempt(auc.held_out_selection, means, labels, qk["top_k"], groups, seed, draws,
                    permutations=permutations)
    if "selected" in held:
        out.update(held_out_auc=held["combined_auc"], held_out_ci=held["combined_ci"],
                   held_out_p=held["test"]["combined_p"], held_out_measurable=held["measurable"],
                   held_out_problems=held["held_out_mixed_problems"],
                   held_out_min_problems=held["min_mixed_problems"],
                   held_out_heads=[[int(i) // n_heads, int(i) % n_heads]
                                   for i in held["selected"]])
    else:
        out["held_out_skipped"] = held["skipped"]
    return out


def receiver_section(results, groups, global_heads, qk_selected, top_k=20,
                     min_scores=MIN_SENTENCE_SCORES, repeats=None, draws=1000,
                     seed=0) -> dict:
    """Receiver heads from the responses with at least `min_scores` vertical scores (with
    fewer the kurtosis is degenerate, 2 scores: always -2; with none left the section says
    'not measurable at this length'), each head's kurtosis against its positional profile
    and the claim of attnrl.analysis.receivers. results: per response, .receiver (L, H)
    or None, .receiver_profile (L, H, n), .extra with 'vertical_scores' and 'spans';
    groups (R,) problems; repeats (R,) repeated sentences dropped per response."""
    repeats = [0] * len(results) if repeats is None else list(repeats)
    rows = [i for i, r in enumerate(results)
            if r.receiver is not None and r.extra.get("vertical_scores", 0) >= min_scores]
    base = {"min_sentence_scores": min_scores,
            "responses_with_sentences": sum(r.receiver is not None for r in results),
            "repeated_sentences_dropped": int(sum(repeats)),
            "responses_with_repeats": int(sum(k > 0 for k in repeats))}
    if not rows:
        return {**base, "responses": 0, "measurable": False,
                "note": f"not measurable at this length: no response has >= {min_scores} "
                        "vertical scores (distinct sentences beyond the proximity window)"}
    stacked = torch.from_numpy(np.stack([np.asarray(results[i].receiver) for i in rows]))
    heads = select_receiver_heads(stacked, min(top_k, stacked.shape[1] * stacked.shape[2]))
    mean = stacked.nanmean(0)
    profiles = [np.asarray(results[i].receiver_profile, dtype=np.float64) for i in rows]
    spans = [results[i].extra["spans"] for i in rows]
    check_profiles(profiles, spans)
    excess = positional_excess(profiles, spans, min_scores)
    group_rows = None if groups is None else np.asarray(groups)[rows]
    claim = receiver_claim(excess["excess"], group_rows, draws, seed)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # heads never scored: NaN
        positional = np.nanmean(excess["positional"], 0)
        mean_excess = np.nanmean(excess["excess"], 0)
    heads_set = {tuple(h) for h in heads}
    global_set = {tuple(h) for h in global_heads}
    return {**base, "responses": len(rows), "measurable": True,
            "top_heads": [list(h) for h in heads],
            "top_kurtosis": [float(mean[l, h]) for l, h in heads],
            "top_positional_kurtosis": [float(positional[l, h]) for l, h in heads],
            "mean_kurtosis": torch.nan_to_num(mean, nan=math.nan).tolist(),
            "positional_kurtosis": positional.tolist(),
            "excess_kurtosis": mean_excess.tolist(),
            "claim": _claim_json(claim),
            "overlap_with_global_heads": len(heads_set & global_set),
            "global_heads": len(global_set),
            "overlap_with_qk_heads": len(heads_set & {tuple(h) for h in qk_selected})}


def _claim_json(claim: dict) -> dict:
    """receiver_claim as JSON: the heads beyond their positional profile and the best one."""
    out = {key: claim[key] for key in ("measurable", "margin", "min_responses", "responses")}
    if not claim["measurable"]:
        return out
    lower = np.nan_to_num(claim["lower"], nan=-np.inf)
    best = np.unravel_index(int(np.argmax(lower)), lower.shape)
    out.update(heads=[list(h) for h in claim["heads"]], quantile=claim["quantile"],
               best_head=[int(i) for i in best], best_excess=float(claim["mean"][best]),
               best_lower=float(claim["lower"][best]))
    return out
