"""The credit strategies by name, without torch: what a command checks before anything heavy
is imported. tests/attnrl/test_credit_names.py keeps this equal to attnrl.credit's registry
(`CREDIT_STRATEGIES`, each strategy's `signed` and `requires`)."""

from __future__ import annotations

from attnrl.errors import UserError, nearest

CREDIT_STRATEGIES = ("uniform", "local_chunk", "global_anchor", "coupled", "random", "entropy",
                     "bottom_q", "qk_tokens", "qk_consistency", "qk_premise", "sign_flip")
SIGNED_CREDIT = ("sign_flip",)  # registered with signed=True: never composed
PER_RESPONSE_CREDIT = ("qk_consistency",)  # reads the outcome advantages: one factor a response
ATTENTION_CREDIT = {  # strategies that read the attention, by what they read
    "local_chunk": "signals", "global_anchor": "signals", "coupled": "signals",
    "bottom_q": "signals", "qk_tokens": "qk", "qk_consistency": "qk", "qk_premise": "qk"}


def credit_problem(value) -> str | None:
    """What is wrong with a (possibly '+'-joined) strategy name, or None."""
    parts = [p.strip() for p in str(value).split("+")]
    for part in parts:
        if part not in CREDIT_STRATEGIES:
            return (f"unknown credit strategy {part!r}{nearest(part, CREDIT_STRATEGIES)}; "
                    f"registered: {', '.join(sorted(CREDIT_STRATEGIES))} (join several "
                    "with '+')")
        if part in SIGNED_CREDIT and len(parts) > 1:
            return (f"{part!r} (a negative gamma) cannot be composed with '+': the product is "
                    f"clipped at 0; use {part} alone")
    return None


def check_credit(value) -> list[str]:
    """The parts of a strategy name; UserError naming the problem when it has one."""
    problem = credit_problem(value)
    if problem:
        raise UserError(problem)
    return [p.strip() for p in str(value).split("+")]


def within_response_problem(strategy: str) -> str | None:
    """Why a strategy places no credit within a response (S = 1 by construction in
    `attnrl fidelity`), or None: it flips whole responses, or is only per-response
    factors of the outcome advantage."""
    parts = check_credit(strategy)
    if any(p in SIGNED_CREDIT for p in parts):
        return "flips whole responses' advantages: no credit within a response"
    if all(p in PER_RESPONSE_CREDIT for p in parts):
        return "a per-response factor of the outcome advantage: no credit within a response"
    return None


def within_response_strategies() -> list[str]:
    """Every registered strategy that places credit within a response."""
    return [n for n in sorted(CREDIT_STRATEGIES) if within_response_problem(n) is None]
