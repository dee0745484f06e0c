"""From per-response forward results to every number of the analysis report (a JSON-able
dict). Sections: coupling, heads, outcome, qk, qk_premise, receivers.

Choices where the method is silent:
- The local / global split is pooled over all responses (token-weighted span, as the
  trainer pools one batch), on the sampled layers; per-layer coupling splits each layer's
  own heads with the same quantile.
- Peaks: top p of WAAD and of Delta among response tokens, of FAI among tokens with a
  non-empty future window; 'FAI peak follows a source peak' = a source peak at 0..k tokens
  before it (attnrl.analysis.stats.coupling).
- QK heads are ranked by AUC with high score = correct (the rule of qk_tokens /
  qk_consistency); the held-out split is by problem.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnrl.analysis import stats
from attnrl.analysis.forward import pooled_span, response_signals
from attnrl.signals.aggregate import select_heads, token_sets
from attnrl.signals.receiver import select_receiver_heads


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
    return {"waad": stats.peak_mask(signals.waad, mask, p),
            "delta": stats.peak_mask(signals.delta, mask, p),
            "fai": stats.peak_mask(signals.fai, signals.fai_valid, p)}


def coupling_section(results, groups, sampled, split, config, p, k, permutations, bootstrap,
                     seed, n_layers, quantile):
    signals, mask = response_signals(results, sampled, split, config)
    top = peaks(signals, mask, p)
    out = {"p": p, "k": k}
    for source in ("waad", "delta"):
        out[f"fai_after_{source}"] = stats.coupling(
            top["fai"], top[source], signals.fai_valid, k, permutations, bootstrap, seed, groups)
    # the trainer's own sets (top q): anchors after preplan tokens, preplan_by delta / waad
    by = {}
    for rank_by in ("delta", "waad"):
        cfg = _replace(config, preplan_by=rank_by)
        _, preplan, anchor, _, _ = token_sets(signals.waad, signals.fai, signals.fai_valid,
                                              mask, cfg)
        by[rank_by] = stats.coupling(anchor, preplan, signals.fai_valid, k, permutations,
                                     bootstrap, seed, groups)
    out["anchors_after_preplan_by"] = by
    per_layer = []
    all_spans = pooled_span(results)
    for layer in range(n_layers):
        span = torch.from_numpy(all_spans[[layer]])
        layer_split = select_heads(span, quantile)
        sig, m = response_signals(results, [layer], layer_split, config)
        t = peaks(sig, m, p)
        row = {"layer": layer}
        for source in ("waad", "delta"):
            c = stats.coupling(t["fai"], t[source], sig.fai_valid, k, max(1000, permutations // 5),
                               max(200, bootstrap // 5), seed, groups)
            row[source] = {key: c[key] for key in ("observed", "observed_ci", "chance", "ratio",
                                                    "ratio_ci", "p_value")}
        per_layer.append(row)
    out["per_layer"] = per_layer
    return out, signals, mask


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


def qk_section(results, labels, groups, n_heads, top_k, permutations, draws, seed) -> dict:
    scores = np.stack([r.answer_score.reshape(-1) for r in results])        # (R, L*H)
    logprob = np.array([float(np.mean(r.logprobs)) for r in results])
    rng = np.random.default_rng(seed)
    full = stats.auc_permutation(scores, labels, permutations, rng)
    held = stats.held_out_selection(scores, labels, top_k, groups, seed, draws)
    base_full = stats.auc_permutation(logprob, labels, permutations, rng)
    _, hold = stats.split_groups(groups, labels.size, seed)
    hold_groups = np.asarray(groups)[hold]
    base_held = float(stats.auc_columns(logprob[hold][:, None], labels[hold])[0])
    base_held_ci = stats.auc_bootstrap(logprob[hold], labels[hold], hold_groups, draws, rng)[0]
    heads = [[i // n_heads, i % n_heads] for i in range(scores.shape[1])]
    best = int(np.argmax(np.abs(np.array(full["auc"]) - 0.5)))
    return {"auc": np.array(full["auc"]).reshape(-1, n_heads).tolist(),
            "p": np.array(full["p"]).reshape(-1, n_heads).tolist(),
            "p_fwer": np.array(full["p_fwer"]).reshape(-1, n_heads).tolist(),
            "permutations": permutations,
            "best_head": heads[best], "best_auc": full["auc"][best],
            "best_p_fwer": full["p_fwer"][best],
            "significant_heads_fwer_0.05": [heads[i] for i, p in enumerate(full["p_fwer"])
                                            if p < 0.05],
            "held_out": {**held, "selected": [heads[i] for i in held["selected"]]},
            "logprob_baseline": {"auc": base_full["auc"][0], "p": base_full["p"][0],
                                 "held_out_auc": base_held, "held_out_ci": base_held_ci},
            "top_k": top_k, "_order": np.argsort(-np.array(full["auc"]), kind="stable")}


def premise_section(results, signals, mask, labels, groups, qk, n_heads, q, k, seed,
                    permutations, draws) -> dict:
    """qk_premise: the response tokens most aligned with the prompt keys on the QK heads
    (top-k by AUC on all responses, the trainer's rule): do they coincide with anchors /
    preplan tokens, and does the response-mean alignment predict correctness (heads chosen
    on the selection half, AUC on the held-out half)?"""
    chosen = qk["_order"][:qk["top_k"]]
    n_max = mask.shape[1]
    per_token = torch.zeros(mask.shape)
    for i, r in enumerate(results):
        flat = r.premise.reshape(-1, r.premise.shape[-1])
        per_token[i, :flat.shape[1]] = torch.from_numpy(flat[chosen].mean(0))
    top = stats.peak_mask(per_token, mask, q)
    out = {"heads": [[int(i) // n_heads, int(i) % n_heads] for i in chosen], "q": q}
    out["anchors"] = stats.coupling(top, signals.anchor_mask, mask, 0, permutations, draws,
                                    seed, groups)
    out["preplan"] = stats.coupling(top, signals.preplan_mask, mask, 0, permutations, draws,
                                    seed, groups)
    select, hold = stats.split_groups(groups, labels.size, seed)
    means = np.stack([r.premise.reshape(-1, r.premise.shape[-1]).mean(-1) for r in results])
    if labels[select].any() and not labels[select].all() and labels[hold].any() \
            and not labels[hold].all():
        fit = stats.auc_columns(means[select], labels[select])
        heads = np.argsort(-fit, kind="stable")[:qk["top_k"]]
        value = means[hold][:, heads].mean(-1)
        out["held_out_auc"] = float(stats.auc_columns(value[:, None], labels[hold])[0])
        out["held_out_ci"] = stats.auc_bootstrap(value, labels[hold],
                                                 np.asarray(groups)[hold], draws,
                                                 np.random.default_rng(seed))[0]
        out["held_out_heads"] = [[int(i) // n_heads, int(i) % n_heads] for i in heads]
    del n_max
    return out


def receiver_section(results, global_heads, qk_selected, top_k=20) -> dict:
    rows = [r.receiver for r in results if r.receiver is not None]
    if not rows:
        return {"responses": 0, "note": "no response has 6 or more sentences"}
    stacked = torch.from_numpy(np.stack(rows))
    heads = select_receiver_heads(stacked, min(top_k, stacked.shape[1] * stacked.shape[2]))
    mean = stacked.nanmean(0)
    heads_set = {tuple(h) for h in heads}
    global_set = {tuple(h) for h in global_heads}
    return {"responses": len(rows), "top_heads": [list(h) for h in heads],
            "top_kurtosis": [float(mean[l, h]) for l, h in heads],
            "mean_kurtosis": torch.nan_to_num(mean, nan=math.nan).tolist(),
            "overlap_with_global_heads": len(heads_set & global_set),
            "global_heads": len(global_set),
            "overlap_with_qk_heads": len(heads_set & {tuple(h) for h in qk_selected})}
