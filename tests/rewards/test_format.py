"""Format reward: the answer marker is present or not; custom patterns."""

import pytest

from attnrl.data import DEFAULT_INSTRUCTION
from attnrl.errors import UserError
from rewards import get_reward
from rewards.format import format_reward


@pytest.mark.parametrize("text, score", [
    ("steps...\n#### 42", 1.0),
    ("steps... ####-3", 1.0),
    ("so $\\boxed{\\frac12}$", 1.0),
    ("steps... ####", 0.0),
    ("steps... #### \n", 0.0),
    ("the answer is 42", 0.0),
    ("boxed{3}", 0.0),
])
def test_default_pattern(text, score):
    assert format_reward([""], [text]) == [score]


def test_default_instruction_answer_counts():
    assert "####" in DEFAULT_INSTRUCTION
    assert format_reward([""], ["short reasoning\n#### 5"]) == [1.0]


def test_custom_pattern_and_bad_pattern():
    tags = get_reward("format", pattern=r"<answer>.+</answer>")
    assert tags(["", ""], ["<answer>4</answer>", "#### 4"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="not a valid regular expression"):
        get_reward("format", pattern="(unclosed")([""], ["x"])
