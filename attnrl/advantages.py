"""Outcome advantage estimators, registered by name (docs/methods.md sections 3 and 6).

An estimator maps one scalar reward per response to one advantage per response:

    compute_advantages("grpo", rewards, group_ids)          # (G_total,) -> (G_total,)

`group_ids` says which prompt each response answers; groups may have any size and need not
be contiguous. A new estimator is one function:

    @register_estimator("my_estimator")
    def my_estimator(rewards, groups, *, my_option=1.0):   # rewards (G_total,), Groups
        return rewards - groups.mean(rewards)

Its keyword-only parameters are the options `compute_advantages` accepts for it.

NaN rewards (a response no reward function could score) follow TRL's GRPOTrainer: they are
left out of every group and batch statistic and get advantage 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attnrl.errors import UserError, nearest

EstimatorFn = Callable[..., torch.Tensor]
ESTIMATORS: dict[str, EstimatorFn] = {}
"""Registered estimators by name."""

GRPO_EPS = 1e-6
"""Default eps of `grpo` (docs/methods.md section 6)."""
TRL_GRPO_EPS = 1e-4
"""The eps TRL's GRPOTrainer (1.16) adds to the std; pass eps=TRL_GRPO_EPS to match it."""
SCALE_STD_CHOICES = ("group", "batch", "none")


def register_estimator(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: register `fn(rewards, groups, **options) -> advantages` under `name`."""
    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS and ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn
    return decorator


@dataclass(frozen=True)
class Groups:
    """Group membership of a batch of responses, with per-group statistics broadcast back
    to every response (all outputs are (G_total,))."""

    index: torch.Tensor  # (G_total,) long, dense group number 0..K-1 of each response
    sizes: torch.Tensor  # (K,) long, responses per group

    @classmethod
    def from_ids(cls, group_ids: torch.Tensor) -> Groups:
        """Build from arbitrary integer ids (one per response)."""
        _, index = torch.unique(group_ids, return_inverse=True)
        sizes = torch.bincount(index, minlength=int(index.max()) + 1 if index.numel() else 0)
        return cls(index=index, sizes=sizes)

    def size(self) -> torch.Tensor:
        """Size of each response's group (G_total,) long."""
        return self.sizes[self.index]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over each response's group."""
        totals = torch.zeros(self.sizes.shape[0], dtype=x.dtype, device=x.device)
        return totals.index_add_(0, self.index, x)[self.index]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of x over each response's group."""
        return self.sum(x) / self.size().to(x.dtype)

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased (n - 1) standard deviation over each response's group, as torch.std
        and TRL; 0 for a group of one."""
        n = self.size().to(x.dtype)
        squares = self.sum((x - self.mean(x)) ** 2)
        return torch.where(n > 1, squares / (n - 1).clamp(min=1), torch.zeros_like(x)).sqrt()


def make_group_ids(num_prompts: int, n: int, device=None) -> torch.Tensor:
    """Group ids for `num_prompts` prompts with `n` consecutive responses each:
    [0]*n + [1]*n + ... (num_prompts * n,) long."""
    if num_prompts < 0 or n < 1:
        raise UserError(f"need num_prompts >= 0 and n >= 1 responses per prompt, got "
                        f"num_prompts={num_prompts}, n={n}")
    return torch.arange(num_prompts, device=device).repeat_interleave(n)


def group_ids_from_sizes(sizes: Sequence[int], device=None) -> torch.Tensor:
    """Group ids for consecutive groups of the given sizes, e.g. [2, 3] -> [0, 0, 1, 1, 1]."""
    sizes_t = torch.as_tensor(list(sizes), dtype=torch.long, device=device)
    if (sizes_t < 0).any():
        raise UserError(f"group sizes must be >= 0, got {list(sizes)}")
    return torch.arange(len(sizes_t), device=device).repeat_interleave(sizes_t)


def estimator_options(name: str) -> set[str]:
    """The option names `compute_advantages(name, ...)` accepts."""
    fn = _lookup(name)
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def compute_advantages(name: str, rewards, group_ids, **options) -> torch.Tensor:
    """Advantage of each response under estimator `name`.

    rewards: (G_total,) float (a list works too); group_ids: (G_total,) integer.
    options: the estimator's own (see `estimator_options`). Returns (G_total,) float on
    rewards' device; NaN rewards get advantage 0 and are left out of every statistic.
    """
    fn = _lookup(name)
    accepted = estimator_options(name)
    for key in options:
        if key not in accepted:
            raise UserError(f"advantage estimator {name!r} has no option {key!r}"
                            f"{nearest(key, accepted)}; its options: {sorted(accepted) or 'none'}")
    rewards, group_ids = _check_inputs(rewards, group_ids)
    scored = ~torch.isnan(rewards)
    advantages = torch.zeros_like(rewards)
    if scored.any():
        groups = Groups.from_ids(group_ids[scored])
        advantages[scored] = fn(rewards[scored], groups, **options).to(rewards.dtype)
    return advantages


def _lookup(name: str) -> EstimatorFn:
    if name not in ESTIMATORS:
        raise UserError(f"unknown advantage estimator {name!r}{nearest(name, ESTIMATORS)}; "
                        f"registered: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


def _check_inputs(rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1:
        raise UserError(f"rewards must be 1-D (one per response), got shape "
                        f"{tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise UserError(f"group_ids {tuple(group_ids.shape)} must have the shape of rewards "
                        f"{tuple(rewards.shape)}: one group id per response")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise UserError(f"group_ids must be integers, got dtype {group_ids.dtype}; build them "
                        "with make_group_ids(num_prompts, n)")
    if torch.isinf(rewards).any():
        bad = rewards[torch.isinf(rewards)][0].item()
        raise UserError(f"rewards must be finite, got {bad}; clip the reward function output")
    return rewards, group_ids.long()


def _correct(name: str, rewards: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean correctness of each response: reward >= threshold, or, with no threshold,
    the reward itself, which must then be 0 or 1."""
    if threshold is not None:
        return rewards >= threshold
    binary = (rewards == 0) | (rewards == 1)
    if not binary.all():
        bad = rewards[~binary][0].item()
        raise UserError(f"advantage estimator {name!r} needs binary rewards (1 correct, "
                        f"0 incorrect) but got reward {bad}; set the option "
                        f"correctness_threshold=T so that rewards >= T count as correct")
    return rewards == 1


@register_estimator("grpo")
def grpo(rewards, groups: Groups, *, scale_std: str = "group", eps: float = GRPO_EPS):
    """(r - group mean) / (std + eps). scale_std: 'group' (std of the group), 'batch'
    (std of the whole batch; the mean stays per group), 'none' (no division, = dr_grpo).
    The std is unbiased (n - 1), as torch.std and TRL's GRPOTrainer."""
    if scale_std not in SCALE_STD_CHOICES:
        raise UserError(f"scale_std must be one of {list(SCALE_STD_CHOICES)}, got "
                        f"{scale_std!r}{nearest(scale_std, SCALE_STD_CHOICES)}")
    centred = rewards - groups.mean(rewards)
    if scale_std == "none":
        return centred
    if scale_std == "group":
        std = groups.std(rewards)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


@register_estimator("dr_grpo")
def dr_grpo(rewards, groups: Groups):
    """r - group mean (Dr. GRPO: no std division)."""
    return rewards - groups.mean(rewards)


@register_estimator("rloo")
def rloo(rewards, groups: Groups):
    """Leave-one-out baseline: r_i - mean of the other responses of the group; 0 for a
    group of one."""
    n = groups.size().to(rewards.dtype)
    others = (groups.sum(rewards) - rewards) / (n - 1).clamp(min=1)
    return torch.where(n > 1, rewards - others, torch.zeros_like(rewards))


@register_estimator("psr")
def psr(rewards, groups: Groups, *, correctness_threshold: float | None = None):
    """Positive-sample reinforcement: +1 if correct, else 0. Binary rewards."""
    return _correct("psr", rewards, correctness_threshold).to(rewards.dtype)


@register_estimator("nsr")
def nsr(rewards, groups: Groups, *, correctness_threshold: float | None = None):
    """Negative-sample reinforcement: 0 if correct, else -1. Binary rewards."""
    return _correct("nsr", rewards, correctness_threshold).to(rewards.dtype) - 1.0


@register_estimator("w_reinforce")
def w_reinforce(rewards, groups: Groups, *, lambda_: float | None = None,
                w_reinforce_lambda: float | None = None,
                correctness_threshold: float | None = None):
    """Weighted REINFORCE: lambda if correct, else -1 (lambda 0.1 by default; 1 is
    REINFORCE, 0 is NSR). `lambda_` and `w_reinforce_lambda` are the same option."""
    if lambda_ is not None and w_reinforce_lambda is not None and lambda_ != w_reinforce_lambda:
        raise UserError(f"w_reinforce got lambda_={lambda_} and w_reinforce_lambda="
                        f"{w_reinforce_lambda}; set only one of them")
    lam = next((v for v in (lambda_, w_reinforce_lambda) if v is not None), 0.1)
    correct = _correct("w_reinforce", rewards, correctness_threshold)
    return torch.where(correct, torch.full_like(rewards, float(lam)),
                       torch.full_like(rewards, -1.0))
