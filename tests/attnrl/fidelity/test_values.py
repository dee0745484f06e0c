"""Monte-Carlo prefix values: which prefixes are continued, how continuations are capped and
scored, and the planted case end to end through a scripted policy whose value function is
known exactly.

`ScriptedPolicy` is a synthetic policy, not a stand-in for vLLM (the command's test runs the
real vLLM and transformers engines): token 7 in the prefix is the decisive step, after which
a continuation is correct with probability 0.9; before it, with probability 0.1. Its value
function is therefore known, which no real model offers."""

import math

import numpy as np
import pytest

from attnrl.fidelity.report import CEILING, response_records, summarize
from attnrl.fidelity.values import (
    CutResponse,
    binomial_se,
    continuation_requests,
    estimate_values,
    step_advantages,
    values_of,
    wilson_interval,
)
from attnrl.rollout.base import Completion, RolloutEngine

DECISIVE = 7


class _Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class ScriptedPolicy(RolloutEngine):
    tokenizer = _Decoder()

    def __init__(self, seed=0, full_length=False):
        self.rng = np.random.default_rng(seed)
        self.full_length = full_length   # answer as the max_tokens-th token, else the 2nd
        self.calls = []

    def generate(self, prompts, sampling, progress=False, seeds=None):
        self.calls.append((len(prompts), sampling.max_tokens))
        out = []
        for p, prompt in enumerate(prompts):
            chance = 0.9 if DECISIVE in prompt else 0.1
            group = []
            for j in range(sampling.n):
                pad = sampling.max_tokens - 1 if self.full_length else 1
                tail = [1] * pad + [99 if self.rng.random() < chance else 98]
                group.append(Completion(p, j, list(prompt), tail, [0.0] * len(tail), ""))
            out.append(group)
        return out

    def update_weights(self, state_dict):
        raise NotImplementedError


def score(problems, texts):
    """Correct when the last token of the capped text is 99 (the scripted answer)."""
    return [t.split()[-1] == "99" for t in texts]


def test_requests_start_once_per_problem_and_at_every_interior_cut():
    cuts = [CutResponse(0, [5, 5], [1, 2, 3, 4], True, [0, 2, 4]),
            CutResponse(0, [5, 5], [1, 2, 9], False, [0, 1, 2, 3]),
            CutResponse(1, [6], [1, 2], True, [0, 2])]
    prompts, keys = continuation_requests(cuts)
    assert keys == [("start", 0), ("cut", 0, 1), ("cut", 1, 1), ("cut", 1, 2), ("start", 1)]
    assert prompts == [[5, 5], [5, 5, 1, 2], [5, 5, 1], [5, 5, 1, 2], [6]]


def test_a_continuation_keeps_the_response_length_cap():
    """A prefix of b tokens may add max_tokens - b: the scripted answer token sits at the
    end of a full-length continuation, so every prefix longer than 0 loses it."""
    cut = CutResponse(0, [1], [2, 3, 4, 5], True, [0, 2, 4])
    policy = ScriptedPolicy(full_length=True)
    estimate_values(policy, [cut], 4, 1.0, 1.0, 6, 0, score)
    assert cut.trials == [4, 4]
    assert cut.successes[1] == 0          # prefix of 2 + 6 generated > cap 6: answer cut off


def test_values_binomial_uncertainty():
    assert binomial_se(3, 12) == pytest.approx(math.sqrt(0.25 * 0.75 / 12))
    low, high = wilson_interval(0, 8)
    assert low == 0.0 and 0.3 < high < 0.4            # Wilson: 0 of 8 is not certainty
    low, high = wilson_interval(4, 8)
    assert low < 0.5 < high
    cut = CutResponse(0, [1], [1, 2, 3], True, [0, 1, 3], successes=[2, 6], trials=[8, 8],
                      half_successes=[1, 4])
    assert values_of(cut).tolist() == [0.25, 0.75, 1.0]
    assert step_advantages(cut).tolist() == [0.5, 0.25]
    assert values_of(cut, "first").tolist() == [0.25, 1.0, 1.0]
    assert values_of(cut, "second").tolist() == [0.25, 0.5, 1.0]     # (2-1)/4, (6-4)/4


def test_planted_decisive_token_is_recovered_from_scripted_continuations():
    """Responses with the decisive token in one chunk: the estimated D peaks on that chunk,
    a strategy that amplifies the decisive token beats its permutation, one that amplifies
    the token two places later (another chunk) does not."""
    rng = np.random.default_rng(0)
    cuts, marked, late = [], [], []
    for p in range(20):
        for _ in range(2):
            n = 24
            at = int(rng.integers(0, n))
            ids = [1] * n
            ids[at] = DECISIVE
            cuts.append(CutResponse(p, [5], ids, bool(rng.random() < 0.9), [0, 6, 12, 18, 24]))
            g = np.ones(n)
            g[at] = 1.5
            marked.append(g)
            h = np.ones(n)
            h[(at + 6) % n] = 1.5
            late.append(h)
    estimate_values(ScriptedPolicy(1), cuts, 16, 1.0, 1.0, 64, 0, score)
    hits = 0
    for cut in cuts:
        d = np.abs(step_advantages(cut))
        hits += int(np.argmax(d) == cut.response_ids.index(DECISIVE) // 6)
    # misses: a wrong outcome (10%) makes the last step the largest
    assert hits >= 0.75 * len(cuts)
    rows = response_records(cuts, {"marked": marked, "late": late}, 1.5, 100, 0)
    summary = summarize(rows, ["marked", "late"], {"seed": 0, "qk_heads": {}},
                        calibration_redraws=0)
    table = summary["strategies"]
    assert table["marked"]["verdict"] == "beats its permutation and its position profile"
    assert not table["late"]["verdict"].startswith("beats")
    assert table[CEILING]["S"]["mean"] >= table["marked"]["S"]["mean"]
    # the positive control: credit from 8 continuations, scored on the other 8
    assert summary["controls"]["split_control_detected"]
    assert table["mc_split"]["S"]["low"] > 1.0
