"""Math answer reward: extraction rules, GSM8K gold agreement, perturbation rejection."""

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from attnrl.data import DEFAULT_INSTRUCTION, gsm8k_final_answer, gsm8k_path
from attnrl.errors import UserError
from attnrl.answers.math_answer import extract_math_answer, math_reward

GSM8K_TEST = gsm8k_path("test")


@pytest.fixture(scope="module")
def gsm8k():
    with open(GSM8K_TEST) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [(row["answer"], gsm8k_final_answer(row["answer"])) for row in rows]


def _without_marker(solution: str) -> str:
    return solution[:solution.rfind("####")].rstrip()


def test_every_gsm8k_gold_solution_scores_one(gsm8k):
    solutions, golds = zip(*gsm8k)
    assert len(golds) == 1319
    assert math_reward([""] * len(golds), list(solutions), answer=list(golds)) == [1.0] * 1319
    # the same final answer given as \boxed{} or as a trailing number instead of '####'
    boxed = [_without_marker(s) + f"\nSo the answer is $\\boxed{{{g}}}$." for s, g in gsm8k]
    plain = [_without_marker(s) + f"\nThe answer is {g}." for s, g in gsm8k]
    assert math_reward([""] * 1319, boxed, answer=list(golds)) == [1.0] * 1319
    assert math_reward([""] * 1319, plain, answer=list(golds)) == [1.0] * 1319


def test_every_gsm8k_perturbed_answer_scores_zero(gsm8k):
    rng = random.Random(0)
    plus_one, wrong = [], []
    for solution, gold in gsm8k:
        head = _without_marker(solution)
        plus_one.append(f"{head}\n#### {int(gold) + 1}")
        other = int(gold) + rng.choice([-1, 1]) * rng.randint(2, 1000)
        wrong.append(f"{head}\n#### {other}")
    golds = [g for _, g in gsm8k]
    assert math_reward([""] * 1319, plus_one, answer=golds) == [0.0] * 1319
    assert math_reward([""] * 1319, wrong, answer=golds) == [0.0] * 1319


def test_latex_equivalents_go_through_math_verify(gsm8k):
    # a seeded sample: gold written as an unreduced fraction (correct) and gold+1 the same
    # way (wrong); neither is a plain number, so math-verify decides
    sample = random.Random(1).sample(gsm8k, 60)
    golds = [g for _, g in sample]
    right = [f"\\boxed{{\\frac{{{2 * int(g)}}}{{2}}}}" for g in golds]
    wrong = [f"\\boxed{{\\frac{{{2 * int(g) + 2}}}{{2}}}}" for g in golds]
    assert math_reward([""] * 60, right, answer=golds) == [1.0] * 60
    assert math_reward([""] * 60, wrong, answer=golds) == [0.0] * 60


@pytest.mark.parametrize("text, expected, rule", [
    ("so \\boxed{12} #### 13 and 14", "12", "boxed"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
    ("first \\boxed{1}, finally \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}", "boxed"),
    ("work 5 + 6 = 11\n#### 11\nextra 99", "11", "####"),
    ("#### 3\n#### 1,234.", "1,234", "####"),
    ("####\n\n  **72**", "72", "####"),
    ("she has 3 apples, then -12.5 left", "-12.5", "number"),
    ("ratio 3/4 in total", "3/4", "number"),
    ("x2 and y3 only", None, None),
    ("no answer here", None, None),
])
def test_extraction_priority(text, expected, rule):
    assert extract_math_answer(text) == (expected, rule)


@pytest.mark.parametrize("completion, gold, score", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("#### 0.5", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\sqrt{2}/2", 0.0),
    ("#### $1,000.00", "1000", 1.0),
    ("#### 72 clips", "72", 1.0),
    ("#### 71 clips", "72", 0.0),
    ("The answer is 18 dollars.", "18", 1.0),
    ("nothing numeric", "18", 0.0),
])
def test_equivalence(completion, gold, score):
    assert math_reward([""], [completion], answer=[gold]) == [score]


def test_default_instruction_format_is_understood():
    assert "####" in DEFAULT_INSTRUCTION
    reply = "Half of 48 is 24, and 48 + 24 = 72.\n#### 72"
    assert math_reward([""], [reply], answer=["72"]) == [1.0]
    assert math_reward([""], [reply.replace("#### 72", "#### 70")], answer=["72"]) == [0.0]


def test_worker_threads_give_the_same_scores(gsm8k):
    sample = random.Random(2).sample(gsm8k, 20)
    completions = [f"\\boxed{{\\frac{{{2 * int(g) + i % 2}}}{{2}}}}" for i, (_, g) in
                   enumerate(sample)]
    golds = [g for _, g in sample]
    main = math_reward([""] * 20, completions, answer=golds)
    assert main == [1.0 if i % 2 == 0 else 0.0 for i in range(20)]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda i: math_reward([""], [completions[i]],
                                                       answer=[golds[i]])[0], range(20)))
        assert threading.current_thread() is threading.main_thread()
    assert threaded == main


def test_conversational_completions_and_bad_columns():
    chat = [[{"role": "assistant", "content": "#### 7"}], [{"role": "assistant", "content": "8"}]]
    assert math_reward(["", ""], chat, answer=["7", "7"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="answer"):
        math_reward([""], ["#### 7"])
    with pytest.raises(UserError, match="1 entries for 2 completions"):
        math_reward(["", ""], ["#### 7", "#### 8"], answer=["7"])


def test_number_fast_path_matches_exact_rationals():
    rng = random.Random(3)
    for _ in range(300):
        a, b = Fraction(rng.randint(-999, 999), rng.randint(1, 9)), None
        b = a if rng.random() < 0.5 else a + Fraction(rng.randint(1, 5), rng.randint(1, 9))
        text = f"#### {a.numerator}/{a.denominator}" if a.denominator > 1 else f"#### {a}"
        gold = f"{b.numerator}/{b.denominator}" if b.denominator > 1 else str(b)
        assert math_reward([""], [text], answer=[gold]) == [float(a == b)], (text, gold)
