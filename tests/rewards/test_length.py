"""DAPO overlong shaping vs its definition (methods.md section 6)."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl.errors import UserError
from rewards import get_reward
from rewards.length import overlong_penalty, overlong_reward


def reference(length: int, l_max: int, l_c: int) -> float:
    """Piecewise definition, written out case by case."""
    if length <= l_max - l_c:
        return 0.0
    if length <= l_max:
        return ((l_max - l_c) - length) / l_c
    return -1.0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_matches_definition_on_random_lengths(l_max, data):
    l_c = data.draw(st.integers(1, l_max))
    lengths = data.draw(st.lists(st.integers(0, 2 * l_max + 5), min_size=1, max_size=20))
    got = overlong_reward([""] * len(lengths), [""] * len(lengths), completion_lengths=lengths,
                          max_completion_length=l_max, overlong_buffer=l_c)
    assert got == pytest.approx([reference(n, l_max, l_c) for n in lengths], abs=1e-12)


@pytest.mark.parametrize("l_max, l_c", [(100, 20), (20480, 4096), (8, 8), (7, 1)])
def test_boundaries(l_max, l_c):
    start = l_max - l_c
    for n in (0, start - 1, start, start + 1, (start + l_max) // 2, l_max - 1, l_max,
              l_max + 1, 10 * l_max):
        if n < 0:
            continue
        assert overlong_penalty(n, l_max, l_c) == pytest.approx(reference(n, l_max, l_c),
                                                               abs=1e-12)
    # continuous at both ends of the buffer, bounded in [-1, 0], non-increasing
    assert overlong_penalty(start, l_max, l_c) == 0.0
    assert overlong_penalty(l_max, l_max, l_c) == -1.0
    values = [overlong_penalty(n, l_max, l_c) for n in range(2 * l_max)]
    assert all(-1.0 <= v <= 0.0 for v in values)
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_lengths_from_completion_ids_and_registry():
    rng = random.Random(0)
    ids = [[rng.randrange(100) for _ in range(rng.randrange(0, 70))] for _ in range(30)]
    reward = get_reward("overlong", max_completion_length=50, overlong_buffer=10)
    assert reward.__name__ == "overlong"
    got = reward([""] * 30, [""] * 30, completion_ids=ids)
    assert got == [reference(len(x), 50, 10) for x in ids]
    # default buffer: 20 % of the cap
    got = overlong_reward([""] * 30, [""] * 30, completion_ids=ids, max_completion_length=50)
    assert got == [reference(len(x), 50, 10) for x in ids]


def test_bad_input():
    with pytest.raises(UserError, match="max_completion_length"):
        overlong_reward([""], [""], completion_lengths=[3])
    with pytest.raises(UserError, match="completion_lengths"):
        overlong_reward([""], [""], max_completion_length=10)
    with pytest.raises(UserError, match="overlong_buffer"):
        overlong_reward([""], [""], completion_lengths=[3], max_completion_length=10,
                        overlong_buffer=11)
    with pytest.raises(UserError, match="one per completion"):
        overlong_reward([""] * 2, [""] * 2, completion_lengths=[3], max_completion_length=10)


def test_job_overlong_reward_takes_the_jobs_own_cap():
    """`rewards: {overlong: 1}` with no reward_options shapes against the job's
    max_completion_length (it used to stop at the first reward call after the model had
    loaded); an explicit option still wins."""
    from rewards.length import overlong_penalty
    from trainers.job import build_rewards

    funcs, weights = build_rewards({"rewards": {"overlong": 1.0}, "max_completion_length": 64})
    lengths = [10, 50, 60, 64]
    got = funcs[0]([""] * 4, [""] * 4, completion_lengths=lengths)
    assert got == [overlong_penalty(n, 64, _default_buffer(64)) for n in lengths]
    assert weights == [1.0]
    funcs, _ = build_rewards({"rewards": {"overlong": 1.0}, "max_completion_length": 64,
                              "reward_options": {"overlong": {"max_completion_length": 40}}})
    assert funcs[0]([""], [""], completion_lengths=[50])[0] == overlong_penalty(
        50, 40, _default_buffer(40))


def _default_buffer(max_length):
    from rewards.length import DEFAULT_BUFFER_FRACTION

    return max(1, round(DEFAULT_BUFFER_FRACTION * max_length))
