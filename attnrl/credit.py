"""Per-token credit strategies, registered by name (docs/methods.md section 1.5).

A strategy turns a response's tokens into weights gamma_t; the trainer's per-token advantage
is A_{i,t} = gamma_t * A_i:

    gamma = compute_gamma(config, signals, response_mask, entropy, generator)   # (B, N)
    token_adv = shape_advantages(config, advantages, gamma, response_mask)     # (B, N)

All (B, N) tensors are aligned with each other (the signal code aligns TokenSignals with
the input positions; the trainer passes a response mask on the same positions). gamma is
1.0 outside the response, so it is neutral wherever it is multiplied; `shape_advantages`
returns 0 there. Everything here runs without gradient.

A new strategy is one function of a `CreditInputs`, returning a per-token (B, N) or a
per-response (B,) gamma; `requires` names the inputs it reads:

    @register_credit("my_strategy", requires=("signals",))
    def my_strategy(inputs):
        return bonus(inputs.config, inputs.signals.anchor_mask)

Composition: a name joined with '+' ('coupled+random') multiplies the strategies' gammas
token by token (a per-response gamma scales every token of its response), then clips the
product to [0, gamma_max] (gamma_max defaults to max(gamma_amp, 1)): combining can
redistribute or shrink credit but never exceed one strategy's bonus. A single strategy is
never clipped. A strategy registered with `signed=True` (a negative gamma, e.g. `sign_flip`)
cannot be composed: the clip would turn its -1 into 0; it is refused with a UserError.

`sign_flip` is a positive control for ablations: it flips the sign of a random
`flip_fraction` of the responses' advantages (gamma = -1 on every token of a flipped
response), so the expected advantage is (1 - 2 flip_fraction) A at unchanged magnitude:
less learning signal at the same noise, known in advance to learn more slowly than
`uniform`. (A constant scale of the advantages would not do: Adam's update is invariant to
it, and gradient clipping keeps its direction.)

QK strategies (docs/methods.md section 2; formulas in attnrl.signals.qk_select): `qk_tokens`
reads extras['qk_token_scores'] (B, N); `qk_premise` reads extras['qk_premise_scores']
(B, N); `qk_consistency` reads extras['qk_validity'] (B,)
and extras['advantages'] (B,), and is a per-response factor, so it composes with any
token strategy ('coupled+qk_consistency').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from attnrl.errors import UserError, nearest
from attnrl.signals.types import SignalConfig, TokenSignals, top_q_mask

APPLY_TO_CHOICES = ("both", "positive", "negative")
INPUT_DESCRIPTIONS = {
    "signals": "the per-token attention signals (TokenSignals from the signal capture)",
    "entropy": "the per-token entropy of the policy (B, N)",
    "qk_token_scores": "the answer query's QK alignment with each response token (B, N), "
                       "NaN where not eligible (attnrl.signals.qk_select.token_scores)",
    "qk_validity": "the per-response QK validity score (B,) "
                   "(attnrl.signals.qk_select.validity)",
    "advantages": "the outcome advantages (B,), one per response",
    "qk_premise_scores": "each response token's QK alignment with the prompt keys on the "
                         "selected heads (B, N), NaN where not eligible "
                         "(attnrl.signals.qk_select.premise_token_scores)",
}
QK_INPUTS = frozenset({"qk_token_scores", "qk_validity", "qk_premise_scores"})
"""Credit inputs that come from the QK capture (a trainer or command captures QK scores
only when a strategy requires one of them)."""


@dataclass
class CreditConfig:
    """How per-token credit is assigned (docs/methods.md section 1.5). [P] paper value,
    [D] chosen here.

    The top-q fraction has one source of truth, `signals.q`: the signal code marks preplan
    and anchor tokens with it, and the control strategies (random, entropy, bottom_q) mark
    the same fraction, so controls and signal strategies amplify equally many tokens.
    """

    strategy: str = "uniform"
    """Strategy name, or several joined with '+' (see the module docstring)."""
    gamma_amp: float = 1.5
    """Weight of an amplified token; its bonus is gamma_amp - 1 [P]."""
    apply_to: Literal["both", "positive", "negative"] = "both"
    """Which advantages are shaped: both signs [P, v2 default], only A > 0, or only A < 0;
    the others keep gamma = 1."""
    signals: SignalConfig = field(default_factory=SignalConfig)
    """Signal settings. Its `q` is the top fraction of every strategy here, its `alpha` the
    coupled strategy's transfer fraction; pass the same object to the signal code."""
    seed: int = 0
    """Seed of the `random` and `sign_flip` strategies when the caller passes no generator
    [D]."""
    gamma_max: float | None = None
    """Upper clip of a '+'-combined gamma; None = max(gamma_amp, 1) [D]."""
    qk_damp: float = 0.5
    """qk_consistency: the largest damping of an advantage, factor in [1 - qk_damp, 1] [D]."""
    flip_fraction: float = 0.25
    """sign_flip: probability that a response's advantage is flipped, in [0, 1]; the expected
    advantage is (1 - 2 flip_fraction) A, half of uniform's at 0.25 [D]."""

    def __post_init__(self):
        if isinstance(self.signals, dict):
            names = {f.name for f in fields(SignalConfig)}
            for key in self.signals:
                if key not in names:
                    raise UserError(f"unknown signal option {key!r}{nearest(key, names)}; "
                                    f"options: {sorted(names)}")
            self.signals = SignalConfig(**self.signals)
        if not self.gamma_amp > 0:
            raise UserError(f"gamma_amp must be > 0 (1.5 in the paper), got {self.gamma_amp}")
        if self.apply_to not in APPLY_TO_CHOICES:
            raise UserError(f"apply_to must be one of {list(APPLY_TO_CHOICES)}, got "
                            f"{self.apply_to!r}{nearest(self.apply_to, APPLY_TO_CHOICES)}")
        if not 0.0 < self.signals.q <= 1.0:
            raise UserError(f"q must be in (0, 1] (0.4 in the paper), got {self.signals.q}")
        if not 0.0 <= self.signals.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {self.signals.alpha}")
        if self.gamma_max is not None and not self.gamma_max > 0:
            raise UserError(f"gamma_max must be > 0 or None, got {self.gamma_max}")
        if not 0.0 <= self.qk_damp <= 1.0:
            raise UserError(f"qk_damp must be in [0, 1] (0.5 by default), got {self.qk_damp}")
        if not 0.0 <= self.flip_fraction <= 1.0:
            raise UserError(f"flip_fraction must be in [0, 1] (0.25 by default), got "
                            f"{self.flip_fraction}")
        strategy_parts(self.strategy)

    @property
    def q(self) -> float:
        """The top-q fraction (read from `signals.q`)."""
        return self.signals.q


SIGNAL_RUN_KEYS = {"signal_layers": "layers", "signal_head_quantile": "head_quantile",
                   "freeze_head_split": "freeze_head_split", "signal_window": "window",
                   "signal_h_lo": "h_lo", "signal_h_hi": "h_hi", "signal_q": "q",
                   "preplan_by": "preplan_by", "coupled_k": "k", "coupled_alpha": "alpha",
                   "tau_waad": "tau_waad", "tau_delta": "tau_delta"}
CREDIT_RUN_KEYS = {"credit": "strategy", "gamma_amp": "gamma_amp",
                   "credit_apply_to": "apply_to", "credit_seed": "seed", "qk_damp": "qk_damp",
                   "credit_flip_fraction": "flip_fraction"}
"""A training config's key -> the SignalConfig / CreditConfig field it sets."""


def credit_config_from_run(run: dict, **overrides) -> CreditConfig:
    """The CreditConfig a training config (`attnrl train` key names; absent keys: their
    defaults) stands for, with CreditConfig fields in `overrides` (e.g. strategy=...).
    The trainer builds its own this way (AttnGRPOConfig.credit_config)."""
    signals = SignalConfig(**{name: run[key] for key, name in SIGNAL_RUN_KEYS.items()
                              if key in run})
    credit = {name: run[key] for key, name in CREDIT_RUN_KEYS.items() if key in run}
    return CreditConfig(**{**credit, **overrides}, signals=signals)


@dataclass
class CreditInputs:
    """What a strategy function receives. Tensors are (B, N) on one device."""

    config: CreditConfig
    response_mask: torch.Tensor                 # (B, N) bool
    signals: TokenSignals | None = None
    entropy: torch.Tensor | None = None         # (B, N) float, nats
    generator: torch.Generator | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CreditStrategy:
    fn: Callable[[CreditInputs], torch.Tensor]
    requires: frozenset[str]
    signed: bool = False
    """True if its gamma can be negative: it cannot be composed with '+'."""


CREDIT_STRATEGIES: dict[str, CreditStrategy] = {}
"""Registered strategies by name."""


def register_credit(name: str, requires=(), signed: bool = False):
    """Decorator: register `fn(inputs: CreditInputs) -> gamma` under `name`. `requires`:
    the inputs it reads ('signals', 'entropy', or the name of an extra tensor); `signed`:
    its gamma can be negative (never composed, since composition clips at 0)."""
    if "+" in name:
        raise ValueError(f"credit strategy names cannot contain '+': {name!r}")

    def decorator(fn):
        if name in CREDIT_STRATEGIES and CREDIT_STRATEGIES[name].fn is not fn:
            raise ValueError(f"credit strategy {name!r} is already registered")
        CREDIT_STRATEGIES[name] = CreditStrategy(fn, frozenset(requires), bool(signed))
        return fn
    return decorator


def strategy_parts(strategy: str) -> list[str]:
    """Split a possibly '+'-joined strategy name, checking every part is registered and
    that no signed strategy is composed."""
    parts = [p.strip() for p in str(strategy).split("+")]
    for part in parts:
        if part not in CREDIT_STRATEGIES:
            raise UserError(f"unknown credit strategy {part!r}"
                            f"{nearest(part, CREDIT_STRATEGIES)}; registered: "
                            f"{', '.join(sorted(CREDIT_STRATEGIES))} (join several with '+')")
    signed = [p for p in parts if CREDIT_STRATEGIES[p].signed]
    if signed and len(parts) > 1:
        raise UserError(f"credit strategy {signed[0]!r} gives negative gamma and cannot be "
                        f"composed ({strategy!r}): '+' clips gamma to [0, gamma_max], which "
                        "would turn its flips into zeros; run it alone")
    return parts


def required_inputs(strategy: str | CreditConfig) -> set[str]:
    """Inputs a strategy needs, e.g. {'signals'}, {'entropy'} or set(). A trainer captures
    attention only when 'signals' is in it."""
    name = strategy.strategy if isinstance(strategy, CreditConfig) else strategy
    return set().union(*(CREDIT_STRATEGIES[p].requires for p in strategy_parts(name)))


def make_generator(config: CreditConfig) -> torch.Generator:
    """A CPU generator seeded with config.seed; keep one per run for the `random` and
    `sign_flip` strategies so each step draws afresh, reproducibly."""
    return torch.Generator().manual_seed(int(config.seed))


def step_seed(seed: int, step: int, process_index: int = 0) -> int:
    """The credit generator's seed at optimizer `step` on rank `process_index`: the draws
    of `random` and `sign_flip` differ between steps and between ranks (each rank holds
    other completions), and a resumed run redraws the same ones. Rank 0's seed is the
    single-process one; other ranks' are hashes of (seed, step, rank) in 32 bits (the
    CPU generator keeps only a seed's low 32 bits)."""
    if process_index == 0:
        return int(seed) * 1_000_003 + int(step)
    from attnrl.rollout.seeds import sample_seed

    return sample_seed(seed, step, process_index, -1) & 0xFFFFFFFF


def bonus(config: CreditConfig, mask: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
    """1 + fraction * (gamma_amp - 1) on `mask`, 1 elsewhere. (B, N) float32."""
    return 1.0 + fraction * (config.gamma_amp - 1.0) * mask.to(torch.float32)


def compute_gamma(config: CreditConfig, signals: TokenSignals | None,
                  response_mask: torch.Tensor, entropy: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, **extras) -> torch.Tensor:
    """Per-token credit weights gamma (B, N) float32, 1.0 outside the response.

    signals / entropy / extras are needed only by the strategies that read them
    (`required_inputs`); `generator` drives `random` and `sign_flip` (None: a fresh one
    from config.seed).
    """
    parts = strategy_parts(config.strategy)
    response_mask = _check_mask(response_mask)
    provided = {"signals": signals, "entropy": entropy, **extras}
    needed = required_inputs(config.strategy)
    for name in sorted(needed):
        if provided.get(name) is None:
            what = INPUT_DESCRIPTIONS.get(name, f"the input {name!r}")
            no_capture = sorted(n for n, s in CREDIT_STRATEGIES.items() if not s.requires)
            raise UserError(f"credit strategy {config.strategy!r} needs {what}, which was not "
                            f"given; pass it, or choose a strategy that needs no inputs: "
                            f"{', '.join(no_capture)}")
    _check_shapes(response_mask, signals if "signals" in needed else None,
                  entropy if "entropy" in needed else None,
                  {k: v for k, v in extras.items() if k in needed})
    inputs = CreditInputs(config, response_mask, signals, entropy, generator, dict(extras))
    with torch.no_grad():
        gamma = torch.ones(response_mask.shape, dtype=torch.float32,
                           device=response_mask.device)
        for part in parts:
            factor = CREDIT_STRATEGIES[part].fn(inputs).detach().to(gamma)
            gamma = gamma * (factor.unsqueeze(-1) if factor.dim() == 1 else factor)
        if len(parts) > 1:
            top = config.gamma_max if config.gamma_max is not None else max(config.gamma_amp, 1.0)
            gamma = gamma.clamp(0.0, top)
        return torch.where(response_mask, gamma, torch.ones_like(gamma))


def shape_advantages(config: CreditConfig, advantages: torch.Tensor, gamma: torch.Tensor,
                     response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages A_{i,t} = gamma_t * A_i (B, N) float32, 0 outside the response.

    advantages: (B,) one per response. gamma applies where the advantage's sign matches
    config.apply_to; elsewhere the token keeps A_i. No gradient flows through the result.
    """
    response_mask = _check_mask(response_mask)
    if advantages.dim() != 1 or advantages.shape[0] != response_mask.shape[0]:
        raise UserError(f"advantages must be (B,) = ({response_mask.shape[0]},), one per "
                        f"response, got {tuple(advantages.shape)}")
    if gamma.shape != response_mask.shape:
        raise UserError(f"gamma {tuple(gamma.shape)} must match response_mask "
                        f"{tuple(response_mask.shape)}")
    with torch.no_grad():
        adv = advantages.detach().to(torch.float32)
        if config.apply_to == "positive":
            shaped = adv > 0
        elif config.apply_to == "negative":
            shaped = adv < 0
        else:
            shaped = torch.ones_like(adv, dtype=torch.bool)
        weight = torch.where(shaped.unsqueeze(-1), gamma.detach().to(torch.float32),
                             torch.ones_like(gamma, dtype=torch.float32))
        return weight * adv.unsqueeze(-1) * response_mask


def token_advantages(config: CreditConfig, advantages: torch.Tensor,
                     response_mask: torch.Tensor, signals: TokenSignals | None = None,
                     entropy: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, **extras):
    """compute_gamma then shape_advantages. Returns (token advantages (B, N), gamma (B, N))."""
    gamma = compute_gamma(config, signals, response_mask, entropy, generator, **extras)
    return shape_advantages(config, advantages, gamma, response_mask), gamma


def credit_metrics(gamma: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """Summary of gamma over response tokens: mean/min/max, fraction amplified (gamma > 1),
    damped (gamma < 1, negatives included) and negative (gamma < 0: flipped advantages),
    mean amplified tokens per response. Zeros for no tokens."""
    mask = _check_mask(response_mask)
    values = gamma.detach()[mask].to(torch.float32)
    if values.numel() == 0:
        return {k: 0.0 for k in ("gamma_mean", "gamma_min", "gamma_max", "frac_amplified",
                                 "frac_damped", "frac_negative", "amplified_per_response")}
    amplified = (gamma.detach() > 1) & mask
    return {
        "gamma_mean": values.mean().item(),
        "gamma_min": values.min().item(),
        "gamma_max": values.max().item(),
        "frac_amplified": (values > 1).float().mean().item(),
        "frac_damped": (values < 1).float().mean().item(),
        "frac_negative": (values < 0).float().mean().item(),
        "amplified_per_response": amplified.sum(-1).float().mean().item(),
    }


def _check_mask(response_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        shape = tuple(getattr(response_mask, "shape", ()))
        raise UserError(f"response_mask must be a (B, N) tensor, got shape {shape}")
    return response_mask.bool()


def _check_shapes(response_mask, signals, entropy, extras):
    shape = tuple(response_mask.shape)
    named = {"entropy": entropy, **extras}
    if signals is not None:
        for name in ("waad", "fai", "delta", "fai_valid", "preplan_mask", "anchor_mask",
                     "dominated_mask", "intro_mask"):
            named[f"signals.{name}"] = getattr(signals, name)
    for name, tensor in named.items():
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tuple(tensor.shape) != shape:
            raise UserError(f"{name} has shape {tuple(tensor.shape)} but response_mask has "
                            f"{shape}; both must be aligned on the same (B, N) positions")
    if entropy is not None and tuple(entropy.shape) != shape:
        raise UserError(f"entropy has shape {tuple(entropy.shape)} but response_mask has "
                        f"{shape}; pass one entropy value per position")


# ---- strategies -------------------------------------------------------------------------

@register_credit("uniform")
def uniform(inputs: CreditInputs) -> torch.Tensor:
    """gamma = 1 everywhere (plain GRPO)."""
    return torch.ones(inputs.response_mask.shape, dtype=torch.float32,
                      device=inputs.response_mask.device)


@register_credit("local_chunk", requires=("signals",))
def local_chunk(inputs: CreditInputs) -> torch.Tensor:
    """1 + (gamma_amp - 1) on preplan tokens T_loc."""
    return bonus(inputs.config, inputs.signals.preplan_mask & inputs.response_mask)


@register_credit("global_anchor", requires=("signals",))
def global_anchor(inputs: CreditInputs) -> torch.Tensor:
    """1 + (gamma_amp - 1) on anchor tokens T_glob."""
    return bonus(inputs.config, inputs.signals.anchor_mask & inputs.response_mask)


@register_credit("coupled", requires=("signals",))
def coupled(inputs: CreditInputs) -> torch.Tensor:
    """Coupled rhythm: undominated anchors get the full bonus, dominated anchors D (taken
    within T_glob) keep (1 - alpha) of it, their introductory tokens I(D) get alpha of it;
    overlapping bonuses are clipped so gamma stays between 1 and gamma_amp."""
    cfg, sig, resp = inputs.config, inputs.signals, inputs.response_mask
    alpha = cfg.signals.alpha
    anchors = sig.anchor_mask & resp
    dominated = sig.dominated_mask & anchors
    extra = (cfg.gamma_amp - 1.0) * ((anchors & ~dominated).float()
                                     + (1.0 - alpha) * dominated.float()
                                     + alpha * (sig.intro_mask & resp).float())
    gamma = 1.0 + extra
    return gamma.clamp(min(1.0, cfg.gamma_amp), max(1.0, cfg.gamma_amp))


@register_credit("random")
def random_tokens(inputs: CreditInputs) -> torch.Tensor:
    """Control: ceil(q * n) response tokens drawn uniformly per response get the bonus."""
    resp = inputs.response_mask
    scores = _uniform_draws(inputs, resp.shape)
    return bonus(inputs.config, top_q_mask(scores, resp, inputs.config.q))


def _uniform_draws(inputs: CreditInputs, shape) -> torch.Tensor:
    """U(0, 1) draws of `shape` from the run's credit generator (None: a fresh one from
    config.seed), on the response mask's device: what `random` and `sign_flip` draw."""
    generator = inputs.generator
    if generator is None:
        generator = make_generator(inputs.config)
    draws = torch.rand(shape, generator=generator, device=generator.device)
    return draws.to(inputs.response_mask.device)


@register_credit("sign_flip", signed=True)
def sign_flip(inputs: CreditInputs) -> torch.Tensor:
    """Positive control: per response, gamma = -1 (its advantage flipped) with probability
    flip_fraction, else +1; drawn from the credit generator like `random`. Expected
    advantage (1 - 2 flip_fraction) A at unchanged magnitude: it must learn more slowly than
    uniform."""
    flipped = _uniform_draws(inputs, inputs.response_mask.shape[:1]) < inputs.config.flip_fraction
    return torch.where(flipped, -1.0, 1.0).to(torch.float32)


@register_credit("entropy", requires=("entropy",))
def entropy_tokens(inputs: CreditInputs) -> torch.Tensor:
    """Control: the ceil(q * n) highest-entropy response tokens get the bonus."""
    return bonus(inputs.config, top_q_mask(inputs.entropy, inputs.response_mask,
                                           inputs.config.q))


@register_credit("bottom_q", requires=("signals",))
def bottom_q(inputs: CreditInputs) -> torch.Tensor:
    """Control ('bottom-q instead of top'): the ceil(q * n_valid) lowest-FAI tokens among
    those with a non-empty future window (fai_valid) get the bonus, i.e. the anchor rule
    turned upside down."""
    sig = inputs.signals
    valid = sig.fai_valid & inputs.response_mask
    return bonus(inputs.config, top_q_mask(-sig.fai, valid, inputs.config.q))


@register_credit("qk_tokens", requires=("qk_token_scores",))
def qk_tokens(inputs: CreditInputs) -> torch.Tensor:
    """1 + (gamma_amp - 1) on the ceil(q * n) response tokens with the highest QK alignment
    to the answer query on the selected heads (attnrl.signals.qk_select); tokens with a NaN
    score are not eligible, so no selection yet = no bonus."""
    scores = inputs.extras["qk_token_scores"].to(inputs.response_mask.device)
    eligible = inputs.response_mask & ~torch.isnan(scores)
    return bonus(inputs.config, top_q_mask(scores.nan_to_num(0.0), eligible, inputs.config.q))


@register_credit("qk_premise", requires=("qk_premise_scores",))
def qk_premise(inputs: CreditInputs) -> torch.Tensor:
    """docs/methods.md section 2(a): 1 + (gamma_amp - 1) on the ceil(q * n) response tokens
    whose queries align most with the prompt's (premise) keys on the selected heads (mean
    over prompt keys of q_t . k_s, mean over the heads;
    attnrl.signals.qk_select.premise_token_scores); tokens with a NaN score are not
    eligible, so no selection yet = no bonus."""
    scores = inputs.extras["qk_premise_scores"].to(inputs.response_mask.device)
    eligible = inputs.response_mask & ~torch.isnan(scores)
    return bonus(inputs.config, top_q_mask(scores.nan_to_num(0.0), eligible, inputs.config.q))


@register_credit("qk_consistency", requires=("qk_validity", "advantages"))
def qk_consistency(inputs: CreditInputs) -> torch.Tensor:
    """Per-response factor in [1 - qk_damp, 1]: damps the positive advantage of a response
    whose QK validity is below the batch average and the negative advantage of one above it
    (attnrl.signals.qk_select.consistency_factor)."""
    from attnrl.signals.qk_select import consistency_factor

    batch = inputs.response_mask.shape[0]
    valid, adv = inputs.extras["qk_validity"], inputs.extras["advantages"]
    for name, tensor in (("qk_validity", valid), ("advantages", adv)):
        if tuple(tensor.shape) != (batch,):
            raise UserError(f"{name} must be (B,) = ({batch},), one per response, got "
                            f"{tuple(tensor.shape)}")
    return consistency_factor(valid, adv, inputs.config.qk_damp).to(inputs.response_mask.device)
