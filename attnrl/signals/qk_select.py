"""QK-score credit from rollouts: the answer query, per-response scores, head selection
with an EMA of the per-head AUC, and the two credit inputs (docs/methods.md sections 2(b), 2(c)).

Definitions (pure torch; B responses, N positions, H candidate heads):

- Answer position a_i: the last response token that is not an end-of-sequence token (the
  last token before EOS; a response cut at the length limit: its last token). A response
  made only of EOS tokens uses its last one; a row without response tokens has a_i = -1.
- Keys K_i: every non-padding position s <= a_i: the prompt (the premises) and the
  response up to and including the answer token.
- Raw score S^h_{i,s} = q_a . k_s inside head h (attnrl.signals.qk: after rotary, no
  1/sqrt(d) scaling).
- Per-response score r_{i,h} = mean over s in K_i of S^h_{i,s} ('mean', default) or the max.
- Head selection: AUC of r_{., h} against the correctness label (a high score = correct,
  as in the predecessor paper where the highest-scoring option is the prediction), over the
  responses of each observed batch that has both labels; the per-head AUC is smoothed by an
  EMA (the first observation initialises it: ema = auc; then ema <- decay * ema +
  (1 - decay) * auc, per observed batch); every `every` steps the top-k heads of the EMA
  become the selection (ties: lower head index). Before any batch with both labels there
  is no selection and both strategies are neutral (gamma 1).
- Token scores (`qk_tokens`): u_{i,t} = mean over selected heads of S^h_{i,t} for response
  tokens t <= a_i; NaN elsewhere (not eligible for the top-q set).
- Premise scores (`qk_premise`, docs/methods.md section 2(a)): p_{i,t} = mean over selected heads of
  mean over prompt keys s of S^h_{i,t,s} = q_t . k_s (query: response token t itself), for
  every response token t; NaN elsewhere.
- Validity (`qk_consistency`): z_{i,h} = (r_{i,h} - mean_j r_{j,h}) / (std_j r_{j,h} + 1e-6),
  mean and population std over the responses of the batch (rows with a_i >= 0); v_i = mean
  over selected heads of z_{i,h} (0 for a row without response; a single row gives 0).
- Consistency factor, bounded in [1 - damp, 1]:
      A_i > 0:  1 - damp * tanh(max(-v_i, 0))   (correct but inconsistent: damped)
      A_i < 0:  1 - damp * tanh(max(v_i, 0))    (incorrect but consistent: damped)
      A_i = 0:  1
  A response at or above the batch's average validity keeps its positive advantage whole;
  one at or below it keeps its negative advantage whole.
"""

from __future__ import annotations

import torch

from attnrl.errors import UserError
from attnrl.signals.qk import HeadRef, select_heads_by_auc

Z_EPS = 1e-6
REDUCE_CHOICES = ("mean", "max")


# ------------------------------------------------------------------------ positions

def answer_positions(input_ids: torch.Tensor, response_mask: torch.Tensor,
                     eos_token_ids) -> torch.Tensor:
    """(B,) long: the last response position whose token is not EOS (else the last
    response position; -1 for a row without response). input_ids, response_mask (B, N)."""
    response = response_mask.bool()
    eos = torch.as_tensor(list(eos_token_ids or []), dtype=input_ids.dtype,
                          device=input_ids.device)
    content = response & ~torch.isin(input_ids, eos)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)

    def last(mask):
        return torch.where(mask, positions, -1).amax(-1)

    return torch.where(content.any(-1), last(content), last(response))


def key_positions(attention_mask: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(B, N) long: position s where s is a non-padding key with s <= a_i, else -1."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    keep = attention_mask.bool() & (positions[None, :] <= answer[:, None])
    return torch.where(keep, positions[None, :], torch.full_like(keep, -1, dtype=torch.long))


# ------------------------------------------------------------------------ scores

def response_scores(scores: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(B, H, N) answer-query scores (NaN off the key set) -> (B, H) r_{i,h}; NaN for a row
    without keys."""
    if reduce not in REDUCE_CHOICES:
        raise UserError(f"qk_reduce must be one of {list(REDUCE_CHOICES)}, got {reduce!r}")
    if reduce == "mean":
        return scores.nanmean(-1)
    keys = ~torch.isnan(scores)
    best = scores.masked_fill(~keys, float("-inf")).amax(-1)
    return best.masked_fill(~keys.any(-1), float("nan"))


def token_scores(scores: torch.Tensor, selected: torch.Tensor, response_mask: torch.Tensor,
                 answer: torch.Tensor) -> torch.Tensor:
    """u (B, N): mean over the `selected` heads (indices into H) of the answer query's score
    with each response token t <= a_i; NaN elsewhere. scores (B, H, N)."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    eligible = response_mask.bool() & (positions[None, :] <= answer[:, None])
    mean = scores[:, selected.to(scores.device)].mean(1)
    return mean.masked_fill(~eligible, float("nan"))


def premise_token_scores(premise: torch.Tensor, selected: torch.Tensor,
                         response_mask: torch.Tensor) -> torch.Tensor:
    """p (B, N): mean over the `selected` heads (indices into H) of each token's premise
    alignment (B, H, N) (attnrl.signals.qk.mean_key_alignment over the prompt keys); NaN
    outside the response."""
    mean = premise[:, selected.to(premise.device)].mean(1)
    return mean.masked_fill(~response_mask.bool().to(mean.device), float("nan"))


def validity(head_scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """v (B,): mean over selected heads of the per-head z-score of r over the batch's rows
    with a score (rows of NaN get 0). head_scores (B, H)."""
    chosen = head_scores[:, selected.to(head_scores.device)].double()
    rows = ~torch.isnan(chosen).any(-1)
    v = torch.zeros(head_scores.shape[0], dtype=torch.float64, device=head_scores.device)
    if rows.any():
        r = chosen[rows]
        z = (r - r.mean(0)) / (r.std(0, unbiased=False) + Z_EPS)
        v[rows] = z.mean(-1)
    return v.float()


def consistency_factor(valid: torch.Tensor, advantages: torch.Tensor,
                       damp: float) -> torch.Tensor:
    """(B,) factor in [1 - damp, 1] from validity v (B,) and outcome advantages A (B,)."""
    v = valid.float()
    adv = advantages.to(v.device).float()
    against = torch.where(adv > 0, (-v).clamp(min=0), v.clamp(min=0))
    factor = 1.0 - damp * torch.tanh(against)
    return torch.where(adv == 0, torch.ones_like(factor), factor)


# ------------------------------------------------------------------------ selection

class HeadSelector:
    """Top-k heads by an EMA of their per-batch AUC, re-selected every `every` steps.

    heads: the candidate (layer, head) pairs, the column order of the scores it observes.
    """

    def __init__(self, heads: list[HeadRef], top_k: int = 4, every: int = 10,
                 decay: float = 0.9):
        if not 1 <= top_k <= len(heads):
            raise UserError(f"qk_top_k must be in 1..{len(heads)} (the candidate heads of "
                            f"the QK layers), got {top_k}")
        if every < 1:
            raise UserError(f"qk_reselect_every must be >= 1 step, got {every}")
        if not 0.0 <= decay < 1.0:
            raise UserError(f"qk_ema must be in [0, 1) (0 = no smoothing), got {decay}")
        self.heads = [(int(l), int(h)) for l, h in heads]
        self.top_k, self.every, self.decay = int(top_k), int(every), float(decay)
        self.ema_auc: torch.Tensor | None = None      # (H,) float64
        self.selected: torch.Tensor | None = None     # (k,) long, indices into heads
        self.selected_at: int | None = None           # step of the last selection
        self.updates = 0                              # observed batches with both labels

    def observe(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Update the EMA with one batch: scores (n, H) r_{i,h}, labels (n,) bool. Rows with
        a NaN score are dropped; a batch without both labels is skipped (returns None).
        Returns the batch's per-head AUC (H,)."""
        scores = scores.detach().double().cpu()
        labels = labels.detach().bool().cpu()
        keep = ~torch.isnan(scores).any(-1)
        scores, labels = scores[keep], labels[keep]
        if labels.all() or not labels.any():
            return None
        _, auc = select_heads_by_auc(scores, labels, self.top_k)
        if self.ema_auc is None:
            self.ema_auc = auc.clone()
        else:
            self.ema_auc = self.decay * self.ema_auc + (1.0 - self.decay) * auc
        self.updates += 1
        return auc

    def maybe_reselect(self, step: int) -> bool:
        """Select the EMA's top-k when there is no selection yet or `every` steps passed
        since the last one (and an EMA exists). Returns whether it re-selected."""
        if self.ema_auc is None:
            return False
        if self.selected is not None and step - self.selected_at < self.every:
            return False
        order = torch.sort(self.ema_auc, descending=True, stable=True).indices
        self.selected = order[:self.top_k].clone()
        self.selected_at = int(step)
        return True

    @property
    def selected_heads(self) -> list[HeadRef]:
        return [] if self.selected is None else [self.heads[i] for i in self.selected.tolist()]

    def state_dict(self) -> dict:
        """JSON-able state (for checkpoints)."""
        return {"heads": [list(h) for h in self.heads], "top_k": self.top_k,
                "ema_auc": None if self.ema_auc is None else self.ema_auc.tolist(),
                "selected": None if self.selected is None else self.selected.tolist(),
                "selected_at": self.selected_at, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        heads = [tuple(h) for h in state["heads"]]
        if heads != self.heads:
            raise UserError("the saved QK head selection was made over other candidate heads "
                            f"({len(heads)} heads) than this run's ({len(self.heads)}); keep "
                            "qk_layers / signal_layers as in the checkpoint's run")
        ema = state.get("ema_auc")
        self.ema_auc = None if ema is None else torch.tensor(ema, dtype=torch.float64)
        chosen = state.get("selected")
        self.selected = None if chosen is None else torch.tensor(chosen, dtype=torch.long)
        self.selected_at = state.get("selected_at")
        self.updates = int(state.get("updates", 0))
