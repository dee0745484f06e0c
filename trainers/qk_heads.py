"""QK-score credit inside the trainer's loss forward (docs/methods.md section 2).

`QKCredit` holds the head-selection state of a run and turns one loss forward into the
credit inputs of `qk_tokens` / `qk_premise` / `qk_consistency` (formulas: attnrl.signals.qk_select):

    qk = QKCredit(model, args, credit_config, eos_token_ids)
    with signal_capture, qk.capture(model, input_ids, attention_mask, response_mask) as cap:
        ...the loss forward...                       # QKCapture innermost: both record
    extras, metrics = qk.credit_inputs(cap, response_mask, labels, advantages, step, ...)
    gamma = compute_gamma(credit_config, signals, response_mask, **extras)

Labels: rollout correctness (reward >= correctness_threshold, else >= 1.0; the trainer puts
it in the batch as 'qk_correct'); a batch without that key uses A_i > 0.
Candidate heads: every query head of `qk_layers` (None: the signal layers). In training, each
loss call's per-response scores and correctness labels (gathered over processes, so every
rank keeps the same selection) update the EMA of the per-head AUC; the selection is redone
every `qk_reselect_every` optimizer steps. Evaluation calls use the selection, never
update it. The state is saved as `qk_heads.json` in each checkpoint and restored on resume
(a checkpoint without it: selection starts afresh).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnrl.credit import QK_INPUTS, CreditConfig, strategy_parts
from attnrl.errors import UserError
from attnrl.signals.qk import PremiseQKCapture, QKCapture, all_heads
from attnrl.signals.qk_select import (
    REDUCE_CHOICES,
    HeadSelector,
    answer_positions,
    consistency_factor,
    key_positions,
    premise_token_scores,
    response_scores,
    token_scores,
    validity,
)

STATE_FILE = "qk_heads.json"


def needs_qk(credit_inputs) -> bool:
    """Whether a strategy's required inputs (attnrl.credit.required_inputs) need QK scores."""
    return bool(QK_INPUTS & set(credit_inputs))


def base_model(model):
    """The transformers model under a PEFT wrapper (DDP / DeepSpeed: unwrap it first, e.g.
    with accelerator.unwrap_model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class QKCredit:
    """Head selection state and per-batch QK credit inputs of one run."""

    def __init__(self, model, args, credit_config: CreditConfig, eos_token_ids):
        model = base_model(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        if args.qk_reduce not in REDUCE_CHOICES:
            raise UserError(f"qk_reduce must be one of {list(REDUCE_CHOICES)}, got "
                            f"{args.qk_reduce!r}")
        count = config.num_hidden_layers
        layers = credit_config.signals.resolve_layers(count) if args.qk_layers is None else \
            sorted({l % count if -count <= l < count else l for l in args.qk_layers})
        self.selector = HeadSelector(all_heads(model, layers), top_k=args.qk_top_k,
                                     every=args.qk_reselect_every, decay=args.qk_ema)
        self.reduce = args.qk_reduce
        self.credit_config = credit_config
        self.damps = "qk_consistency" in strategy_parts(credit_config.strategy)
        self.premise = "qk_premise" in strategy_parts(credit_config.strategy)
        self.eos_token_ids = list(eos_token_ids or [])
        self._answer: torch.Tensor | None = None

    def capture(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> QKCapture:
        """A QKCapture of the answer query against its keys (prompt and response up to the
        answer) for every candidate head; enter it innermost around the loss forward."""
        self._answer = answer_positions(input_ids, response_mask, self.eos_token_ids)
        keys = key_positions(attention_mask, self._answer)
        if self.premise:  # prompt = non-padding tokens outside the response
            prompt = attention_mask.bool() & ~response_mask.bool()
            return PremiseQKCapture(base_model(model), self.selector.heads,
                                    self._answer[:, None], keys, prompt)
        return QKCapture(base_model(model), self.selector.heads, self._answer[:, None], keys)

    def credit_inputs(self, capture: QKCapture, response_mask: torch.Tensor,
                      labels: torch.Tensor, advantages: torch.Tensor, step: int,
                      training: bool = True, gather=None) -> tuple[dict, dict]:
        """(extras for compute_gamma, metrics) from a finished capture.

        labels (B,) bool correctness (the AUC label); advantages (B,) outcome advantages;
        gather: a function concatenating a tensor over processes (None: one process).
        """
        if capture.scores is None:
            raise RuntimeError("the QK capture recorded nothing: the loss forward did not go "
                               "through transformers' attention-function registry")
        scores = capture.scores[:, :, 0, :]                       # (B, H, N)
        per_response = response_scores(scores, self.reduce)       # (B, H), NaN: no response
        metrics: dict[str, float] = {}
        selector = self.selector
        if training:
            gather = gather or (lambda x: x)
            labels = labels.to(per_response.device).bool()
            batch_auc = selector.observe(gather(per_response), gather(labels.long()).bool())
            if selector.maybe_reselect(step):
                metrics["qk/reselected"] = 1.0
            if batch_auc is not None and selector.selected is not None:
                metrics["qk/batch_auc_mean"] = batch_auc[selector.selected].mean().item()
        premise = torch.full(response_mask.shape, float("nan"), device=scores.device)
        if selector.selected is None:
            token = torch.full(response_mask.shape, float("nan"), device=scores.device)
            valid = torch.zeros(response_mask.shape[0], device=scores.device)
        else:
            token = token_scores(scores, selector.selected, response_mask, self._answer)
            if getattr(capture, "premise", None) is not None:
                premise = premise_token_scores(capture.premise, selector.selected,
                                               response_mask)
            valid = validity(per_response, selector.selected)
            ema = selector.ema_auc
            metrics["qk/auc_mean"] = ema[selector.selected].mean().item()
            for index in selector.selected.tolist():
                layer, head = selector.heads[index]
                metrics[f"qk/auc/L{layer}H{head}"] = ema[index].item()
        if self.damps:
            metrics["qk/frac_damped"] = self.frac_damped(valid, advantages, response_mask)
        extras = {"qk_token_scores": token.to(response_mask.device),
                  "qk_premise_scores": premise.to(response_mask.device),
                  "qk_validity": valid.to(response_mask.device),
                  "advantages": advantages.to(response_mask.device)}
        return extras, metrics

    def frac_damped(self, valid, advantages, response_mask) -> float:
        """Fraction of responses whose shaped advantage the consistency factor reduced."""
        adv = advantages.to(valid.device).float()
        factor = consistency_factor(valid, adv, self.credit_config.qk_damp)
        shaped = {"both": torch.ones_like(adv, dtype=torch.bool), "positive": adv > 0,
                  "negative": adv < 0}[self.credit_config.apply_to]
        rows = response_mask.any(-1).to(valid.device)
        count = int(rows.sum())
        return float(((factor < 1) & shaped & rows).sum()) / count if count else 0.0

    # ---- checkpoints
    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).write_text(json.dumps(self.selector.state_dict()))

    def load(self, directory) -> bool:
        """Restore the selection saved in a checkpoint directory; False if it has none."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return False
        self.selector.load_state_dict(json.loads(path.read_text()))
        return True
