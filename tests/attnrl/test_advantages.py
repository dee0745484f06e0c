"""Advantage estimators against loop references of their definitions (methods.md 3, 6).
Tolerance: 1e-5 relative / 1e-6 absolute in float32, 1e-12 in float64."""

import math
import random

import pytest
import torch

from attnrl.advantages import (
    ESTIMATORS,
    TRL_GRPO_EPS,
    compute_advantages,
    estimator_options,
    group_ids_from_sizes,
    make_group_ids,
    register_estimator,
)
from attnrl.errors import UserError

ATOL, RTOL = 1e-6, 1e-5


# ---- loop references ----------------------------------------------------------------------

def members(group_ids, i):
    return [j for j in range(len(group_ids)) if group_ids[j] == group_ids[i]]


def ref_grpo(rewards, group_ids, scale_std="group", eps=1e-6):
    out = []
    batch_std = torch.tensor(rewards, dtype=torch.float64).std().item() if len(rewards) > 1 else 0.0
    for i in range(len(rewards)):
        group = [rewards[j] for j in members(group_ids, i)]
        mean = sum(group) / len(group)
        if scale_std == "none":
            out.append(rewards[i] - mean)
            continue
        if scale_std == "group":
            std = torch.tensor(group, dtype=torch.float64).std().item() if len(group) > 1 else 0.0
        else:
            std = batch_std
        out.append((rewards[i] - mean) / (std + eps))
    return out


def ref_rloo(rewards, group_ids):
    out = []
    for i in range(len(rewards)):
        others = [rewards[j] for j in members(group_ids, i) if j != i]
        out.append(rewards[i] - sum(others) / len(others) if others else 0.0)
    return out


def ref_binary(name, rewards, lam=0.1, threshold=None):
    out = []
    for r in rewards:
        correct = r >= threshold if threshold is not None else r == 1
        if name == "psr":
            out.append(1.0 if correct else 0.0)
        elif name == "nsr":
            out.append(0.0 if correct else -1.0)
        else:
            out.append(lam if correct else -1.0)
    return out


def random_batch(seed, num_groups, binary=False):
    """Rewards with unequal group sizes (1..7), shuffled, with sparse non-contiguous ids."""
    rng = random.Random(seed)
    ids, rewards = [], []
    for g in range(num_groups):
        gid = rng.randrange(-50, 1000) * 7 + g * 10_000  # distinct, arbitrary integers
        for _ in range(rng.randint(1, 7)):
            ids.append(gid)
            rewards.append(float(rng.randint(0, 1)) if binary else rng.uniform(-2, 3))
    order = list(range(len(ids)))
    rng.shuffle(order)
    return [rewards[k] for k in order], [ids[k] for k in order]


def check(actual, expected, dtype=torch.float32):
    expected = torch.tensor(expected, dtype=torch.float64)
    tol = (1e-12, 1e-10) if dtype == torch.float64 else (ATOL, RTOL)
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=tol[0], rtol=tol[1])


# ---- hand-made groups ---------------------------------------------------------------------

HAND_GROUPS = {
    "all_correct": [1.0, 1.0, 1.0, 1.0],
    "all_wrong": [0.0, 0.0, 0.0, 0.0],
    "mixed": [1.0, 0.0, 0.0, 1.0],
    "one_right": [0.0, 0.0, 1.0, 0.0],
}


@pytest.mark.parametrize("case", sorted(HAND_GROUPS))
def test_hand_made_groups(case):
    rewards = HAND_GROUPS[case]
    ids = [0] * len(rewards)
    check(compute_advantages("grpo", rewards, ids), ref_grpo(rewards, ids))
    check(compute_advantages("dr_grpo", rewards, ids), ref_grpo(rewards, ids, "none"))
    check(compute_advantages("rloo", rewards, ids), ref_rloo(rewards, ids))
    for name in ("psr", "nsr", "w_reinforce"):
        check(compute_advantages(name, rewards, ids), ref_binary(name, rewards))
    grpo = compute_advantages("grpo", rewards, ids)
    if case in ("all_correct", "all_wrong"):  # no signal when every response scores the same
        assert torch.equal(grpo, torch.zeros(4))
    else:
        assert (grpo[torch.tensor(rewards) == 1] > 0).all()
        assert (grpo[torch.tensor(rewards) == 0] < 0).all()
        assert abs(grpo.sum().item()) < 1e-5


def test_mixed_group_values_from_definition():
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3); leave-one-out of a 1: 1 - 1/3.
    adv = compute_advantages("grpo", [1.0, 0.0, 0.0, 1.0], [5, 5, 5, 5])
    assert adv[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6), rel=1e-6)
    rloo = compute_advantages("rloo", [1.0, 0.0, 0.0, 1.0], [5, 5, 5, 5])
    assert rloo[0].item() == pytest.approx(1 - 1 / 3, rel=1e-6)
    assert rloo[1].item() == pytest.approx(0 - 2 / 3, rel=1e-6)


# ---- random groups of unequal sizes -------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_groups", [1, 3, 17])
def test_group_estimators_match_loops(seed, num_groups):
    rewards, ids = random_batch(seed, num_groups)
    for scale in ("group", "batch", "none"):
        for eps in (1e-6, 1e-4):
            check(compute_advantages("grpo", rewards, ids, scale_std=scale, eps=eps),
                  ref_grpo(rewards, ids, scale, eps))
    check(compute_advantages("dr_grpo", rewards, ids), ref_grpo(rewards, ids, "none"))
    check(compute_advantages("rloo", rewards, ids), ref_rloo(rewards, ids))


@pytest.mark.parametrize("seed", range(3))
def test_float64_is_kept_and_exact(seed):
    rewards, ids = random_batch(seed, 9)
    r = torch.tensor(rewards, dtype=torch.float64)
    for name, ref in (("grpo", ref_grpo(rewards, ids)), ("rloo", ref_rloo(rewards, ids))):
        out = compute_advantages(name, r, torch.tensor(ids))
        assert out.dtype == torch.float64
        check(out, ref, torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_matches_trl_formula(seed):
    """TRL's GRPOTrainer: (r - group mean) / (nanstd(group) + 1e-4), nanstd unbiased."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g, n = 5, 4
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (g * n,), generator=gen).float() / 2
    grouped = rewards.view(-1, n)
    mean = grouped.mean(1).repeat_interleave(n)
    std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(n)
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    ours = compute_advantages("grpo", rewards, make_group_ids(g, n), eps=TRL_GRPO_EPS)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    batch_expected = (rewards - mean) / (trl_utils.nanstd(rewards) + 1e-4)
    torch.testing.assert_close(
        compute_advantages("grpo", rewards, make_group_ids(g, n), scale_std="batch",
                           eps=TRL_GRPO_EPS), batch_expected, atol=ATOL, rtol=RTOL)


def test_groups_are_independent_of_order_and_id_values():
    rewards, ids = random_batch(11, 8)
    base = compute_advantages("grpo", rewards, ids)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    permuted = compute_advantages("grpo", torch.tensor(rewards)[perm], torch.tensor(ids)[perm])
    torch.testing.assert_close(permuted, base[perm])
    relabelled = compute_advantages("grpo", rewards, [i * 3 - 1 for i in ids])
    torch.testing.assert_close(relabelled, base)


def test_groups_of_one_give_zero():
    for name in ("grpo", "dr_grpo", "rloo"):
        out = compute_advantages(name, [0.3, 1.7, 2.0], [0, 1, 2])
        assert torch.equal(out, torch.zeros(3)), name


def test_nan_rewards_are_left_out_and_get_zero():
    rewards = [1.0, float("nan"), 0.0, 0.5, 1.0, float("nan")]
    ids = [0, 0, 0, 1, 1, 1]
    kept = [0, 2, 3, 4]
    for name, ref in (("grpo", ref_grpo), ("rloo", ref_rloo)):
        out = compute_advantages(name, rewards, ids)
        assert out[1].item() == 0.0 and out[5].item() == 0.0
        check(out[kept], ref([rewards[k] for k in kept], [ids[k] for k in kept]))


# ---- binary-reward estimators -------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_binary_estimators_match_definitions(seed):
    rewards, ids = random_batch(seed, 6, binary=True)
    for name in ("psr", "nsr", "w_reinforce"):
        check(compute_advantages(name, rewards, ids), ref_binary(name, rewards))
    for lam in (0.0, 0.1, 0.5, 1.0):
        check(compute_advantages("w_reinforce", rewards, ids, lambda_=lam),
              ref_binary("w_reinforce", rewards, lam))
        check(compute_advantages("w_reinforce", rewards, ids, w_reinforce_lambda=lam),
              ref_binary("w_reinforce", rewards, lam))
    # lambda 0 is NSR; lambda 1 is REINFORCE (+1 / -1)
    torch.testing.assert_close(compute_advantages("w_reinforce", rewards, ids, lambda_=0.0),
                               compute_advantages("nsr", rewards, ids))


def test_bool_rewards_are_binary():
    out = compute_advantages("nsr", torch.tensor([True, False, True]), [0, 0, 0])
    assert out.tolist() == [0.0, -1.0, 0.0]


@pytest.mark.parametrize("name", ["psr", "nsr", "w_reinforce"])
def test_non_binary_reward_error_names_the_fix(name):
    with pytest.raises(UserError) as err:
        compute_advantages(name, [1.0, 0.0, 0.75, 1.0], [0, 0, 0, 0])
    message = str(err.value)
    assert "correctness_threshold" in message and "0.75" in message and "binary" in message


@pytest.mark.parametrize("seed", range(4))
def test_correctness_threshold_binarizes(seed):
    rng = random.Random(seed)
    rewards = [rng.uniform(0, 1) for _ in range(20)]
    rewards[3] = 0.5  # exactly at the threshold counts as correct
    ids = [k // 5 for k in range(20)]
    for name in ("psr", "nsr", "w_reinforce"):
        check(compute_advantages(name, rewards, ids, correctness_threshold=0.5),
              ref_binary(name, rewards, threshold=0.5))
    assert compute_advantages("psr", rewards, ids, correctness_threshold=0.5)[3].item() == 1.0


def test_conflicting_lambda_is_an_error():
    with pytest.raises(UserError, match="only one"):
        compute_advantages("w_reinforce", [1.0, 0.0], [0, 0], lambda_=0.1,
                           w_reinforce_lambda=0.3)


# ---- registry, options, inputs ------------------------------------------------------------

def test_unknown_estimator_lists_registered():
    with pytest.raises(UserError) as err:
        compute_advantages("grop", [1.0], [0])
    message = str(err.value)
    assert "did you mean 'grpo'" in message
    for name in ("grpo", "dr_grpo", "rloo", "psr", "nsr", "w_reinforce"):
        assert name in message


def test_unknown_option_is_an_error_with_hint():
    with pytest.raises(UserError) as err:
        compute_advantages("grpo", [1.0, 0.0], [0, 0], scale_sdt="batch")
    assert "scale_std" in str(err.value)
    with pytest.raises(UserError, match="scale_std must be one of"):
        compute_advantages("grpo", [1.0, 0.0], [0, 0], scale_std="grup")
    assert estimator_options("grpo") == {"scale_std", "eps"}
    assert estimator_options("rloo") == set()


def test_bad_inputs():
    with pytest.raises(UserError, match="one group id per response"):
        compute_advantages("grpo", [1.0, 0.0], [0])
    with pytest.raises(UserError, match="integers"):
        compute_advantages("grpo", [1.0, 0.0], [0.0, 0.0])
    with pytest.raises(UserError, match="1-D"):
        compute_advantages("grpo", [[1.0, 0.0]], [[0, 0]])
    with pytest.raises(UserError, match="finite"):
        compute_advantages("grpo", [1.0, float("inf")], [0, 0])


def test_group_id_helpers():
    assert make_group_ids(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert group_ids_from_sizes([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    sizes = [1, 4, 2]
    rewards = [0.1 * k for k in range(sum(sizes))]
    ids = group_ids_from_sizes(sizes).tolist()
    check(compute_advantages("rloo", rewards, ids), ref_rloo(rewards, ids))


def test_new_estimator_is_one_function():
    @register_estimator("test_centred_max")
    def centred_max(rewards, groups, *, shift=0.0):
        return rewards - groups.mean(rewards) + shift

    try:
        rewards, ids = random_batch(3, 4)
        out = compute_advantages("test_centred_max", rewards, ids, shift=1.0)
        check(out, [a + 1.0 for a in ref_grpo(rewards, ids, "none")])
        assert estimator_options("test_centred_max") == {"shift"}
    finally:
        ESTIMATORS.pop("test_centred_max")
