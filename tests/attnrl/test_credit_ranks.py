"""The `random` and `sign_flip` controls draw afresh on every rank: the credit generator's
seed (attnrl.credit.step_seed, what the GRPO trainer seeds it with at each step) depends on
the credit seed, the optimizer step and the process index."""

import torch

from attnrl.credit import CreditConfig, compute_gamma, make_generator, step_seed


def draws(strategy: str, seed: int, step: int, rank: int) -> torch.Tensor:
    config = CreditConfig(strategy=strategy, seed=seed, flip_fraction=0.5)
    response = torch.zeros(16, 40, dtype=torch.bool)
    response[:, 8:] = True
    generator = make_generator(config).manual_seed(step_seed(seed, step, rank))
    return compute_gamma(config, None, response, generator=generator)


def test_ranks_steps_and_seeds_draw_different_positions():
    for strategy in ("random", "sign_flip"):
        base = draws(strategy, seed=3, step=5, rank=0)
        assert torch.equal(base, draws(strategy, seed=3, step=5, rank=0))  # reproducible
        for other in ((3, 5, 1), (3, 6, 0), (4, 5, 0), (3, 5, 7)):
            assert not torch.equal(base, draws(strategy, *other)), (strategy, other)


def test_rank_zero_keeps_the_single_process_seed():
    """One process draws as before ranks entered the seed (resumed runs redraw the same)."""
    assert step_seed(3, 5, 0) == 3 * 1_000_003 + 5
    low = {step_seed(s, t, r) & 0xFFFFFFFF  # what torch's CPU generator keeps
           for s in range(3) for t in range(1000) for r in range(8)}
    assert len(low) == 3 * 1000 * 8
