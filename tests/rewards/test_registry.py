"""Reward registry and weighted combination."""

import pytest

from attnrl.errors import UserError
from rewards import REWARDS, combine_rewards, get_reward
from rewards.format import format_reward
from rewards.length import overlong_reward
from attnrl.answers.math_answer import math_reward


def test_registry_names_and_unknown_name():
    assert {"math", "gym", "answer", "format", "overlong"} <= set(REWARDS)
    assert get_reward("math") is math_reward
    with pytest.raises(UserError, match="unknown reward 'maths'.*did you mean 'math'.*format"):
        get_reward("maths")
    with pytest.raises(UserError, match="no option 'max_len'.*max_completion_length"):
        get_reward("overlong", max_len=3)


def test_combination_is_the_weighted_sum_of_its_parts():
    completions = ["#### 4", "#### 5", "4", "\\boxed{4} and more text"]
    columns = {"answer": ["4"] * 4, "completion_lengths": [5, 9, 12, 20]}
    combined = combine_rewards({"math": 1.0, "format": 0.25, "overlong": 0.5},
                               options={"overlong": {"max_completion_length": 16,
                                                     "overlong_buffer": 8}})
    parts = [math_reward([""] * 4, completions, **columns),
             format_reward([""] * 4, completions, **columns),
             overlong_reward([""] * 4, completions, max_completion_length=16,
                             overlong_buffer=8, **columns)]
    expected = [1.0 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*parts)]
    assert combined([""] * 4, completions, **columns) == pytest.approx(expected, abs=1e-12)
    assert combined.components == [("math", 1.0), ("format", 0.25), ("overlong", 0.5)]
    assert len(set(expected)) > 2  # the parts disagree, so the weights matter


def test_combination_bad_input():
    with pytest.raises(UserError, match="finite number"):
        combine_rewards({"math": float("nan")})
    with pytest.raises(UserError, match="at least one"):
        combine_rewards({})
