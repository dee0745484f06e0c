"""Colocated vLLM placement logic (the multi-process runs are in
tests/trainers/test_rollout_ranks.py)."""

import pytest

from attnrl.errors import UserError
from attnrl.rollout.colocate import colocate_kwargs, distributed_layout, tp_groups


def test_tp_groups_are_consecutive_blocks():
    assert tp_groups(8, 1) == [[r] for r in range(8)]
    assert tp_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert tp_groups(8, 8) == [list(range(8))]


@pytest.mark.parametrize("world,tp", [(8, 3), (2, 4), (4, 0)])
def test_tp_size_must_divide_the_world(world, tp):
    with pytest.raises(UserError, match=f"vllm_tensor_parallel_size {tp} must be >= 1 and "
                                        f"divide the number of trainer processes \\({world}\\)"):
        tp_groups(world, tp)


def test_one_process_keeps_vllms_own_executor():
    assert distributed_layout() == (0, 0, 1)
    kwargs, group = colocate_kwargs(1, seed=5)
    assert kwargs == {"seed": 5} and group is None
