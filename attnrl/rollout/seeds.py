"""Per-sample sampling seeds: every sampled completion has its own reproducible stream.

A seed is a hash of integer coordinates into 63 bits (`sample_seed`), so two completions
share a seed only if all their coordinates are equal (up to a 2^-63 hash collision):

- `attnrl generate` / `attnrl eval` / a job's held-out evaluation: (call seed, prompt
  index, sample index), the index in the whole problem list also where ranks split it;
- training: (run seed, phase, optimizer step, generation call within the step, global row),
  where the global row is the completion's index in the whole generation batch across
  ranks (the rows of the lower ranks + local row, `first_rows`: ranks may hold different
  counts). The seeds thus do not depend on how rows are
  split over ranks or grouped into prompts, and a resumed run draws the same seeds at the
  same step.

Engines take the seeds as a list per prompt (`SampleSeeds`, one seed per sample); `None`
everywhere means unseeded (fresh randomness).
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63
SampleSeeds = list[list[int]]  # [prompt][sample] -> seed

PHASES = {"train": 0, "eval": 1}


def sample_seed(*coords: int) -> int:
    """A seed in [0, 2^63) from integer coordinates (blake2b of their 64-bit encodings)."""
    data = b"".join(int(c).to_bytes(16, "little", signed=True) for c in coords)
    digest = hashlib.blake2b(data, digest_size=8, person=b"attnrl-seed").digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def call_seeds(seed: int | None, num_prompts: int, n: int,
               first: int = 0) -> SampleSeeds | None:
    """Seeds of one `generate` call: sample j of prompt p gets sample_seed(seed, p, j),
    for p = first .. first + num_prompts - 1 (`first`: the call's prompts are a slice,
    starting there, of a longer prompt list, e.g. one rank's share of an evaluation)."""
    if seed is None:
        return None
    return [[sample_seed(seed, p, j) for j in range(n)]
            for p in range(first, first + num_prompts)]


def training_seeds(seed: int | None, phase: str, step: int, call: int, first_row: int,
                   num_rows: int) -> list[int] | None:
    """One seed per completion row of a training (or eval) generation: global rows
    first_row .. first_row + num_rows - 1 of generation call `call` at optimizer `step`."""
    if seed is None:
        return None
    return [sample_seed(seed, PHASES[phase], step, call, first_row + i)
            for i in range(num_rows)]


def first_rows(counts: list[int]) -> list[int]:
    """The global index of each rank's first row, given every rank's row count (rank order):
    [3, 5, 2] -> [0, 3, 8]."""
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += int(count)
    return starts


def check_seeds(seeds: SampleSeeds | None, num_prompts: int, n: int) -> None:
    """ValueError unless `seeds` has one list of n seeds per prompt."""
    if seeds is None:
        return
    if len(seeds) != num_prompts or any(len(row) != n for row in seeds):
        raise ValueError(f"need {num_prompts} x {n} sample seeds, got "
                         f"{[len(row) for row in seeds]}")
