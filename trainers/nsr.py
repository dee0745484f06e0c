"""Negative / positive sample reinforcement and W-REINFORCE (docs/methods.md sections 3 and 6).

Outcome advantage of response i from a binary reward r_i (1 correct, 0 incorrect), with no
baseline and no std scaling:

    psr          A_i = +1 if correct, 0 otherwise
    nsr          A_i =  0 if correct, -1 otherwise
    w_reinforce  A_i = lambda if correct, -1 otherwise   (lambda = w_reinforce_lambda, 0.1)

The loss is the PPO clipped surrogate (eps 0.2), averaged over all response tokens of the
micro-batch, one pass per batch, no KL, plus an entropy bonus of 0.001 as in the paper's
official runs. A response with A_i = 0 contributes nothing to the policy term, so under nsr
only incorrect responses (and under psr only correct ones) move the policy; the entropy
bonus alone acts on every response (set entropy_coef 0 for the pure objective).

Everything else is AttnGRPOTrainer: rollout engines, and per-token credit, which turns A_i
into A_{i,t} = gamma_t * A_i for any credit strategy (e.g. nsr + coupled: incorrect
responses get -gamma_t per token, correct ones 0).

Rewards must be exactly 0 or 1 unless `correctness_threshold` is set (reward >= threshold
counts as correct); reasoning-gym scorers give partial credit on some answers, so the
packaged configs set the threshold to 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnrl.errors import UserError, nearest
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer
from trainers.schema_names import NSR_ESTIMATORS  # the estimators it accepts


@dataclass
class NSRConfig(AttnGRPOConfig):
    """AttnGRPOConfig with the defaults of the NSR paper (docs/methods.md section 3).

    loss_type 'bnpo' is TRL's token mean over the local micro-batch
    (sum of per-token losses / number of response tokens in the micro-batch), the paper's
    aggregation; 'dapo' would divide by the token count of the whole generation batch.
    """

    advantage_estimator: str = field(default="nsr", metadata={
        "help": "nsr (penalise incorrect) | psr (reinforce correct) | w_reinforce "
                "(both, correct ones weighted by w_reinforce_lambda)."})
    loss_type: str = field(default="bnpo", metadata={
        "help": "TRL loss aggregation; 'bnpo' = token mean over the micro-batch (paper)."})
    scale_rewards: str = field(default="none", metadata={
        "help": "No std scaling (the estimators use no baseline and no std)."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (paper: 0.2)."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (paper: no KL)."})
    num_iterations: int = field(default=1, metadata={
        "help": "Optimisation passes over each generated batch (paper: 1)."})
    entropy_coef: float = field(default=0.001, metadata={
        "help": "Entropy bonus (official scripts: 0.001; 0 = the pure NSR/PSR objective)."})

    def __post_init__(self):
        super().__post_init__()
        check_nsr_settings(self)


def check_nsr_settings(config) -> None:
    """UserError unless the estimator is one of NSR_ESTIMATORS and its options make sense."""
    estimator = config.advantage_estimator
    if estimator not in NSR_ESTIMATORS:
        raise UserError(
            f"trainer nsr needs advantage_estimator one of {', '.join(NSR_ESTIMATORS)}, got "
            f"{estimator!r}{nearest(estimator, NSR_ESTIMATORS)}; for grpo / dr_grpo / rloo "
            "use trainer: grpo")
    lam = config.w_reinforce_lambda
    if estimator == "w_reinforce" and not (math.isfinite(lam) and lam >= 0):
        raise UserError(f"w_reinforce_lambda must be a finite number >= 0 (0.1 in the paper; "
                        f"1 = REINFORCE, 0 = NSR), got {lam}")
    threshold = config.correctness_threshold
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and math.isfinite(threshold)):
        raise UserError(f"correctness_threshold must be a finite number or null, got "
                        f"{threshold!r}")


class NSRTrainer(AttnGRPOTrainer):
    """AttnGRPOTrainer restricted to the psr / nsr / w_reinforce estimators.

    Checks the estimator at construction, and at every batch that the combined rewards are
    binary (0 or 1) unless `correctness_threshold` is set: a non-binary reward stops the
    training step with a UserError naming that option.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_nsr_settings(self.args)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        if self.args.correctness_threshold is None:
            self._check_binary(rewards_per_func)
        return rewards_per_func

    def _check_binary(self, rewards_per_func: torch.Tensor) -> None:
        """rewards_per_func: (G_total, F) per reward function; checks the weighted sum the
        estimator will see (NaN rows, which no function scored, are skipped)."""
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        scored = ~torch.isnan(rewards_per_func).all(dim=1)
        bad = scored & (rewards != 0) & (rewards != 1)
        if bad.any():
            values = sorted({round(v, 4) for v in rewards[bad].tolist()})[:5]
            funcs = ", ".join(f"{n} (weight {w:g})" for n, w in
                              zip(self.reward_func_names, weights.tolist()))
            raise UserError(
                f"advantage_estimator {self.args.advantage_estimator!r} needs binary rewards "
                f"(1 correct, 0 incorrect), but {int(bad.sum())} of {int(scored.sum())} "
                f"completions got other rewards, e.g. {values}, from {funcs}; set "
                "correctness_threshold (config key, or --correctness_threshold T) so that "
                "rewards >= T count as correct, or use rewards that are exactly 0 or 1")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        # share of responses whose policy term is non-zero (nsr: incorrect, psr: correct)
        active = (output["advantages"] != 0).float().mean().item()
        self._metrics[mode]["advantages/nonzero_frac"].append(active)
        return output
