"""Per-sample seeds: no two rows / steps / ranks / phases share one; the seeds of a step do
not depend on how its rows are split over ranks; a rerun (resume) draws the same."""

import itertools

from attnrl.rollout.seeds import SEED_BITS, call_seeds, sample_seed, training_seeds


def split_over_ranks(seed, step, call, world, rows_per_rank, phase="train"):
    """Every rank's seeds for one generation batch, as the trainer asks for them."""
    return [training_seeds(seed, phase, step, call, rank * rows_per_rank, rows_per_rank)
            for rank in range(world)]


def test_no_collision_across_rows_steps_ranks_calls_phases():
    seen = {}
    for phase, step, call in itertools.product(("train", "eval"), range(30), range(3)):
        for rank, seeds in enumerate(split_over_ranks(0, step, call, world=8, rows_per_rank=4,
                                                         phase=phase)):
            for i, s in enumerate(seeds):
                key = (phase, step, call, rank, i)
                assert s not in seen, f"{key} and {seen[s]} share seed {s}"
                seen[s] = key
    assert all(0 <= s < 2**SEED_BITS for s in seen)
    assert len(seen) == 2 * 30 * 3 * 32


def test_seeds_do_not_depend_on_the_rank_split():
    """8 ranks x 4 rows, 2 x 16 and 1 x 32 see the same 32 seeds in the same order."""
    layouts = [[s for part in split_over_ranks(5, 7, 0, world, 32 // world) for s in part]
               for world in (1, 2, 8)]
    assert layouts[0] == layouts[1] == layouts[2]


def test_rerun_reproduces_and_base_seed_matters():
    assert training_seeds(3, "train", 12, 0, 8, 4) == training_seeds(3, "train", 12, 0, 8, 4)
    assert set(training_seeds(3, "train", 12, 0, 8, 4)).isdisjoint(
        training_seeds(4, "train", 12, 0, 8, 4))
    assert training_seeds(None, "train", 0, 0, 0, 4) is None


def test_old_scheme_collided_where_the_new_one_does_not():
    """The replaced scheme seeded a rank's call with base*1_000_003 + step*9_973 + rank and
    sample j with that + j: rank 1's sample 0 reused rank 0's sample 1's seed."""
    def old(step, rank, j):
        return (0 * 1_000_003 + step * 9_973 + rank) % 2**31 + j

    assert old(0, 1, 0) == old(0, 0, 1)
    new = split_over_ranks(0, 0, 0, world=2, rows_per_rank=4)
    assert new[1][0] != new[0][1]


def test_call_seeds_distinct_per_prompt_and_sample():
    seeds = call_seeds(0, 50, 8)
    flat = [s for row in seeds for s in row]
    assert len(set(flat)) == 400
    assert seeds[3][2] == sample_seed(0, 3, 2)
    assert call_seeds(None, 2, 2) is None


def test_ranks_holding_different_row_counts_never_share_a_seed():
    """Global rows come from the gathered counts (attnrl.rollout.seeds.first_rows, as the
    GRPO trainer gathers them), not rank x local count: with 5 rows on rank 0 and 3 on
    rank 1 the seeds are those of one 8-row batch; rank x count gave rank 1 rows 3..5,
    two of them rank 0's."""
    from attnrl.rollout.seeds import first_rows

    assert first_rows([3, 5, 2]) == [0, 3, 8] and first_rows([4]) == [0]
    counts = [5, 3]
    split = [s for rank, count in enumerate(counts)
             for s in training_seeds(7, "train", 2, 0, first_rows(counts)[rank], count)]
    assert split == training_seeds(7, "train", 2, 0, 0, 8)
    assert len(set(split)) == 8
    old = [s for rank, count in enumerate(counts)
           for s in training_seeds(7, "train", 2, 0, rank * count, count)]
    assert len(set(old)) < 8
