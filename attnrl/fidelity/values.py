"""Monte-Carlo prefix values of `attnrl fidelity`.

For a response y to prompt x cut at b_0 = 0 < ... < b_K = T (attnrl.fidelity.chunks),
V(b_j) = P(correct | x, y_<b_j) is estimated from k continuations of the prefix sampled from
the policy (the same engine, temperature, top-p and length cap as the responses; a prefix of
b tokens may add at most max_tokens - b). V(b_0) is estimated once per problem and shared by
its responses; V(b_K) is the response's own outcome. The step advantage of chunk j is
D_j = V(b_{j+1}) - V(b_j).

Each continuation is scored on the full text (prefix + continuation, decoded together) by
the task's answer check, as the trainer's reward scores a response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CutResponse:
    """One response and where it is cut."""

    problem: int                    # index of its problem (the statistics' cluster)
    prompt_ids: list[int]
    response_ids: list[int]
    correct: bool                   # the response's own outcome: V(b_K)
    bounds: list[int]               # [0, b_1, ..., T]
    chunking: str = "tokens"        # 'sentence' or 'tokens'
    text: str = ""
    # filled by `estimate_values`: successes / continuations at b_0 .. b_{K-1}
    successes: list[int] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)
    half_successes: list[int] = field(default_factory=list)   # first k // 2 continuations


def binomial_se(successes: int, trials: int) -> float:
    """Standard error sqrt(p (1 - p) / k) of a success fraction (0 for k = 0)."""
    if trials <= 0:
        return 0.0
    p = successes / trials
    return math.sqrt(p * (1 - p) / trials)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ((0, 1) for k = 0)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / \
        (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


PARTS = ("all", "first", "second")


def values_of(cut: CutResponse, part: str = "all") -> np.ndarray:
    """V (K + 1,): the estimated values at b_0 .. b_{K-1}, then the response's outcome.
    part: from all k continuations, the first k // 2 ('first': the Monte-Carlo noise check
    and the split control's credit) or the other k - k // 2 ('second': what the split
    control is scored on)."""
    if part == "first":
        wins, trials = cut.half_successes, [t // 2 for t in cut.trials]
    elif part == "second":
        wins = [s - h for s, h in zip(cut.successes, cut.half_successes)]
        trials = [t - t // 2 for t in cut.trials]
    elif part == "all":
        wins, trials = cut.successes, cut.trials
    else:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    estimated = [w / t if t else math.nan for w, t in zip(wins, trials)]
    return np.asarray([*estimated, float(cut.correct)], dtype=float)


def step_advantages(cut: CutResponse, part: str = "all") -> np.ndarray:
    """D (K,): V(b_{j+1}) - V(b_j), from the continuations of `part` (values_of)."""
    return np.diff(values_of(cut, part))


def continuation_requests(cuts: list[CutResponse]) -> tuple[list[list[int]], list[tuple]]:
    """The prefixes to continue and what each is: ('start', problem) once per problem (the
    prompt alone, V(b_0)) and ('cut', response index, j) for every interior cut b_j."""
    prompts, keys, started = [], [], set()
    for r, cut in enumerate(cuts):
        if cut.problem not in started:
            started.add(cut.problem)
            prompts.append(list(cut.prompt_ids))
            keys.append(("start", cut.problem))
        for j in range(1, len(cut.bounds) - 1):
            prompts.append(list(cut.prompt_ids) + list(cut.response_ids[:cut.bounds[j]]))
            keys.append(("cut", r, j))
    return prompts, keys


def estimate_values(engine, cuts: list[CutResponse], continuations: int, temperature: float,
                    top_p: float, max_tokens: int, seed: int, score) -> dict:
    """Sample `continuations` per prefix with `engine` (a RolloutEngine) and fill each cut's
    successes / trials. `score(problems, texts) -> list[bool]`: the task's answer check of
    full response texts for the given problem indices. Returns {'requests', 'completions',
    'generated_tokens'}."""
    from attnrl.rollout import SamplingConfig

    prompts, keys = continuation_requests(cuts)
    groups = engine.generate(prompts, SamplingConfig(
        n=continuations, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
        seed=seed)) if prompts else []
    start_wins: dict[int, tuple[int, int, int]] = {}
    problems, texts, where, generated = [], [], [], 0
    decode = engine.tokenizer.decode
    for key, group in zip(keys, groups):
        if key[0] == "start":
            prefix, problem, budget = [], key[1], max_tokens
        else:
            cut = cuts[key[1]]
            prefix = cut.response_ids[:cut.bounds[key[2]]]
            problem, budget = cut.problem, max_tokens - len(prefix)
        for completion in group:
            # the same length cap as the response: a prefix of b tokens may add max_tokens - b
            tokens = list(prefix) + list(completion.token_ids[:max(budget, 0)])
            generated += min(len(completion.token_ids), max(budget, 0))
            problems.append(problem)
            texts.append(decode(tokens, skip_special_tokens=True))
            where.append(key)
    outcomes = list(score(problems, texts)) if texts else []
    tally: dict[tuple, list[bool]] = {}
    for key, ok in zip(where, outcomes):
        tally.setdefault(key, []).append(bool(ok))
    half = continuations // 2
    for problem in {c.problem for c in cuts}:
        wins = tally.get(("start", problem), [])
        start_wins[problem] = (sum(wins), len(wins), sum(wins[:half]))
    for r, cut in enumerate(cuts):
        first = start_wins[cut.problem]
        cut.successes, cut.trials, cut.half_successes = [first[0]], [first[1]], [first[2]]
        for j in range(1, len(cut.bounds) - 1):
            wins = tally.get(("cut", r, j), [])
            cut.successes.append(sum(wins))
            cut.trials.append(len(wins))
            cut.half_successes.append(sum(wins[:half]))
    return {"requests": len(prompts), "completions": len(texts),
            "generated_tokens": generated}
