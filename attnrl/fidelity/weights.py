"""Per-token credit gamma_t of every strategy for `attnrl fidelity`, from one forward per problem.

The forward is the trainer's loss forward without gradient: one problem's responses as one
batch (prompt + response per row, right-padded), with
- the signal capture (attnrl.signals.capture) on the sampled layers; the local / global head
  split comes from that batch, as the trainer splits a micro-batch holding one GRPO group;
- the QK capture (attnrl.signals.qk) of the answer query against its keys, and every
  response query's alignment with the prompt keys, on every head of the QK layers;
- the entropy of softmax(logits / temperature) at each response token (TRL's entropy).
Each strategy's gamma is then `attnrl.credit.compute_gamma` of a CreditConfig naming it.

QK heads are selected by correctness AUC (`select_heads_by_auc`) on the *other* half of the
problems (cross-fitting): a response's QK credit never depends on its own outcome. A half
whose other half lacks correct or incorrect responses gets no QK credit (None).

Strategies that are per-response factors (they read the outcome `advantages`) or that flip
signs (`sign_flip`) place no credit within a response (S = 1 by construction) and are not
measured (attnrl.credit_names.within_response_problem says why).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from attnrl.credit import QK_INPUTS, CreditConfig, compute_gamma, required_inputs


def _entropy(model, hidden, input_ids, response, temperature: float) -> torch.Tensor:
    """(B, N) entropy (nats) of the next-token distribution at temperature that produced each
    response token (logits at position t - 1), 0 elsewhere."""
    out = torch.zeros(response.shape, dtype=torch.float32)
    rows, cols = response.nonzero(as_tuple=True)
    head = model.get_output_embeddings()
    for start in range(0, rows.numel(), 256):
        r, c = rows[start:start + 256], cols[start:start + 256]
        logits = head(hidden[r, c - 1]).float() / max(temperature, 1e-6)
        logp = torch.log_softmax(logits, -1)
        out[r, c] = -(logp.exp() * logp).sum(-1).cpu()
    return out


@torch.no_grad()
def strategy_weights(model, cuts, strategies: list[str], credit: CreditConfig,
                     temperature: float, eos_token_ids, qk_top_k: int = 4,
                     qk_layers: list[int] | None = None, seed: int = 0,
                     autocast_dtype: torch.dtype | None = None, progress=None) -> tuple[
        dict[str, list], dict]:
    """gamma per strategy and response: {name: [array (T,) on the response's tokens, or
    None where not measurable]}, and info (QK heads per half, per-half reasons)."""
    from dataclasses import replace

    from attnrl.signals.capture import SignalCapture
    from attnrl.signals.qk import PremiseQKCapture, all_heads
    from attnrl.signals.qk_select import answer_positions, key_positions, response_scores

    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    n_layers = int(text_config.num_hidden_layers)
    needs = {name: required_inputs(name) for name in strategies}
    want_signals = any("signals" in n for n in needs.values())
    want_qk = any(n & QK_INPUTS for n in needs.values())
    heads = all_heads(model, credit.signals.resolve_layers(n_layers) if qk_layers is None
                      else qk_layers) if want_qk else []
    gammas: dict[str, list] = {name: [None] * len(cuts) for name in strategies}
    qk_rows: dict[int, dict] = {}
    problems = sorted({c.problem for c in cuts})
    for number, problem in enumerate(problems):
        rows = [i for i, c in enumerate(cuts) if c.problem == problem]
        width = max(len(cuts[i].prompt_ids) + len(cuts[i].response_ids) for i in rows)
        B = len(rows)
        input_ids = torch.zeros(B, width, dtype=torch.long)
        attention = torch.zeros(B, width, dtype=torch.bool)
        response = torch.zeros(B, width, dtype=torch.bool)
        for b, i in enumerate(rows):
            p, n = len(cuts[i].prompt_ids), len(cuts[i].response_ids)
            input_ids[b, :p + n] = torch.tensor(cuts[i].prompt_ids + cuts[i].response_ids)
            attention[b, :p + n] = True
            response[b, p:p + n] = True
        capture = SignalCapture(model, credit.signals, response_mask=response,
                                attention_mask=attention) if want_signals else None
        qk = None
        if want_qk:
            answer = answer_positions(input_ids, response, eos_token_ids)
            qk = PremiseQKCapture(model, heads, answer[:, None], key_positions(attention, answer),
                                  attention & ~response)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None), \
                capture if capture is not None else nullcontext(), \
                qk if qk is not None else nullcontext():
            hidden = base(input_ids=input_ids.to(device),
                          attention_mask=attention.long().to(device),
                          use_cache=False).last_hidden_state
        entropy = _entropy(model, hidden, input_ids, response, temperature)
        del hidden
        signals = capture.token_signals() if capture is not None else None
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(problem))
        for name in strategies:
            if needs[name] & QK_INPUTS:
                continue
            config = replace(credit, strategy=name)
            gamma = compute_gamma(config, signals, response.to(device),
                                  entropy=entropy.to(device), generator=generator).cpu()
            for b, i in enumerate(rows):
                gammas[name][i] = gamma[b][response[b]].numpy().astype(float)
        if qk is not None:
            scores = qk.scores[:, :, 0, :].cpu()                          # (B, H, N)
            per_response = response_scores(scores)                          # (B, H)
            for b, i in enumerate(rows):
                qk_rows[i] = {"scores": scores[b], "r": per_response[b],
                              "premise": qk.premise[b].cpu(), "response": response[b],
                              "answer": answer[b], "entropy": entropy[b]}
        if progress is not None:
            progress(number + 1, len(problems))
    info = {"qk_heads": {}}
    if want_qk:
        info["qk_heads"] = _qk_gammas(cuts, strategies, needs, credit, qk_rows, heads,
                                      qk_top_k, seed, gammas)
    return gammas, info


def _qk_gammas(cuts, strategies, needs, credit, qk_rows, heads, top_k, seed, gammas) -> dict:
    """Cross-fitted QK credit: heads selected on one half of the problems weight the other."""
    from dataclasses import replace

    from attnrl.analysis.stats import split_groups
    from attnrl.signals.qk import select_heads_by_auc
    from attnrl.signals.qk_select import premise_token_scores, token_scores

    groups = np.array([c.problem for c in cuts])
    halves = split_groups(groups, len(cuts), seed=seed)
    labels = torch.tensor([c.correct for c in cuts])
    r = torch.stack([qk_rows[i]["r"] for i in range(len(cuts))])          # (R, H)
    out = {}
    for name_half, (target, source) in enumerate(((halves[0], halves[1]),
                                                   (halves[1], halves[0]))):
        source_labels = labels[source]
        keep = ~torch.isnan(r[source]).any(-1)
        if source.size == 0 or not (source_labels[keep].any() and
                                    not source_labels[keep].all()):
            out[f"half{name_half}"] = {"selected": None, "reason": (
                "the other half has no correct and incorrect responses to select heads by")}
            continue
        selected, aucs = select_heads_by_auc(r[source][keep], source_labels[keep],
                                             min(top_k, len(heads)))
        out[f"half{name_half}"] = {"selected": [list(heads[k]) for k in selected.tolist()],
                                   "auc": [float(aucs[k]) for k in selected.tolist()]}
        for i in target.tolist():
            row = qk_rows[i]
            resp = row["response"][None]
            extras = {"qk_token_scores": token_scores(row["scores"][None], selected, resp,
                                                      row["answer"][None]),
                      "qk_premise_scores": premise_token_scores(row["premise"][None],
                                                                selected, resp)}
            for name in strategies:
                if not needs[name] & QK_INPUTS:
                    continue
                generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
                gamma = compute_gamma(replace(credit, strategy=name), None, resp,
                                      entropy=row["entropy"][None], generator=generator,
                                      **{k: v for k, v in extras.items() if k in needs[name]})
                gammas[name][i] = gamma[0][row["response"]].numpy().astype(float)
    return out
