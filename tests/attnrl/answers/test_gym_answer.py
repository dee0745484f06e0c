"""reasoning-gym reward on real generated entries: gold scores 1, wrong answers 0."""

import pytest

from attnrl.data import load_gym_task
from attnrl.errors import UserError
from attnrl.answers import answer_reward
from attnrl.answers.gym_answer import extract_gym_answer, gym_reward

FORMATS = [
    "Adding step by step.\n#### {a}",
    "Let me think.\n<answer>{a}</answer>",
    "The terms sum up.\nAnswer: {a}.",
    "Working it out\n**{a}**",
    "The final answer is {a}.",          # last-line readings: after 'is', last number
    "We get {expr} = {a}.",
]


@pytest.fixture(scope="module", params=["chain_sum", "basic_arithmetic"])
def records(request):
    return load_gym_task(request.param, size=16, seed=7)


def test_gold_answer_scores_one_in_every_format(records):
    for template in FORMATS:
        completions = [template.format(a=r.answer, expr=r.metadata["entry"]["metadata"][
            "expression"]) for r in records]
        scores = gym_reward([""] * len(records), completions,
                            metadata=[r.metadata for r in records])
        assert scores == [1.0] * len(records), template


def test_wrong_answer_scores_zero(records):
    for template in ("#### {a}", "The final answer is {a}.", "{a}"):
        wrong = [template.format(a=int(float(r.answer)) + 1) for r in records]
        scores = gym_reward([""] * len(records), wrong, metadata=[r.metadata for r in records])
        assert scores == [0.0] * len(records), template
    assert gym_reward([""] * len(records), ["I do not know"] * len(records),
                      metadata=[r.metadata for r in records]) == [0.0] * len(records)


def test_entry_and_task_columns_and_task_inference(records):
    entries = [r.metadata["entry"] for r in records]
    gold = [f"#### {r.answer}" for r in records]
    ones = [1.0] * len(records)
    tasks = [r.metadata["task"] for r in records]
    assert gym_reward([""] * len(records), gold, entry=entries, task=tasks) == ones
    assert gym_reward([""] * len(records), gold, entry=entries, task=tasks[0]) == ones
    assert gym_reward([""] * len(records), gold, entry=entries) == ones  # from source_dataset


@pytest.mark.parametrize("task", ["family_relationships", "countdown", "gsm_symbolic"])
def test_other_tasks_gold_scores_one(task):
    recs = load_gym_task(task, size=6, seed=3)
    scores = gym_reward([""] * 6, [f"Done.\n#### {r.answer}" for r in recs],
                        metadata=[r.metadata for r in recs])
    assert scores == [1.0] * 6


def test_answer_reward_dispatches_gym_and_math():
    gym = load_gym_task("chain_sum", size=2, seed=1)
    completions = [f"#### {gym[0].answer}", "#### 0", "#### 42", "#### 41"]
    metadata = [gym[0].metadata, gym[1].metadata, {"solution": "x"}, {"solution": "y"}]
    scores = answer_reward([""] * 4, completions, answer=[gym[0].answer, gym[1].answer, "42",
                                                          "42"], metadata=metadata)
    expected_second = 1.0 if gym[1].answer == "0" else 0.0
    assert scores == [1.0, expected_second, 1.0, 0.0]


@pytest.mark.parametrize("text, expected", [
    ("a\n#### 12\nb", "12"),
    ("<answer> -3 </answer> then text", "-3"),
    ("reasoning\nanswer: son.", "son"),
    ("reasoning\nThe result\n`6*(98 - 54) - 34`", "6*(98 - 54) - 34"),
    ("", None),
])
def test_extraction(text, expected):
    assert extract_gym_answer(text) == expected


def test_bad_input():
    recs = load_gym_task("chain_sum", size=1)
    with pytest.raises(UserError, match="no task 'chain_summ'.*chain_sum"):
        gym_reward([""], ["#### 1"], entry=[recs[0].metadata["entry"]], task=["chain_summ"])
    with pytest.raises(UserError, match="entry"):
        gym_reward([""], ["#### 1"])
    with pytest.raises(UserError, match="2 entries for 1 completions"):
        gym_reward([""], ["#### 1"], metadata=[recs[0].metadata] * 2)
