"""Held-out problems a job never trained on: disjoint from the training pool by question text
and by canonical form.

A problem is *seen* when its normalised question (`normalize_question`: case folded, white
space collapsed) is the question of any problem in the job's training pool, or when its
canonical form (attnrl/data/equivalence.py: `5 + 3` is `3 + 5`) is the form of one: every
problem the pool's sampler can draw (`TrainingPool`: task, task_size, task_seed,
task_kwargs), not only the prompts a run happened to use. Held-out problems are also distinct
from each other under both keys. Comparing problems, not seeds, is what makes this hold: a
reasoning-gym task generates item i from seed + i, so another seed is no guard (held-out
item i of eval_seed = task_seed + 1 is training item i + 1), and a small task (chain_sum
with two one-digit terms has 200 problems) repeats problems under any seed.

`draw_unseen` takes the evaluation source's candidates in order and keeps the first `size`
distinct unseen ones:
    reasoning-gym task   items of eval_seed, eval_seed + 1, ... (item i depends only on
                         seed + i, so the kept problems never change when more candidates
                         are examined), generated lazily up to `candidate_cap(pool)`
    data file / gsm8k    every row, in file order (any format of attnrl/data/files.py)
When fewer than `size` distinct unseen problems exist it raises UserError naming how many
there are and what to change, before any model loads.

    pool = TrainingPool("chain_sum", size=64, seed=0, kwargs={"min_terms": 2})
    draw = draw_unseen("chain_sum", 128, seed=10_000, task_kwargs={...}, pool=pool)
    draw.records        # 128 PromptRecords, none of whose questions is in the pool
    draw.summary()      # {'candidates', 'dropped_seen', 'dropped_equivalent', ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnrl.data import is_file_task, iter_prompts
from attnrl.data.equivalence import canonical_form, normalize_text
from attnrl.errors import UserError

EXTRA_CANDIDATES = 10_000
"""A reasoning-gym draw examines at most pool size + EXTRA_CANDIDATES candidates [D]; the
cap does not depend on the size asked for, so a refusal's count is exact for that cap."""


def normalize_question(text: str) -> str:
    """The text key of a question: case folded, runs of white space made one space."""
    return normalize_text(text)


@dataclass(frozen=True)
class TrainingPool:
    """Every problem a training job's sampler can draw (trainers/job.py build_dataset)."""

    task: str
    size: int
    seed: int = 0
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> TrainingPool:
        """The pool of a flat job config (task, task_size, task_seed, task_kwargs, and a
        data file's question_field / answer_field; the schema's defaults where a key is
        missing)."""
        from attnrl.data import file_options

        task = str(config.get("task") or "chain_sum")
        return cls(task=task, size=int(config.get("task_size") or 64),
                   seed=int(config.get("task_seed") or 0),
                   kwargs={**dict(config.get("task_kwargs") or {}),
                           **file_options(config, task)})

    def records(self) -> list:
        """The pool's PromptRecords (with repeats)."""
        from attnrl.data import load_prompts

        return load_prompts(self.task, size=self.size, seed=self.seed, **dict(self.kwargs))

    def questions(self) -> set[str]:
        """Normalised questions of the pool."""
        return {normalize_question(r.question) for r in self.records()}

    def keys(self) -> tuple[set[str], set[str]]:
        """(normalised questions, canonical forms) of the pool."""
        records = self.records()
        return ({normalize_question(r.question) for r in records},
                {canonical_form(r) for r in records})


@dataclass
class UnseenDraw:
    """The held-out problems of one draw and what was dropped on the way."""

    records: list
    candidates: int          # candidates examined
    dropped_seen: int        # candidates whose question text is in the training pool
    dropped_duplicate: int   # unseen candidates repeating an earlier kept question's text
    pool_problems: int       # distinct questions in the training pool
    dropped_equivalent: int = 0   # other text, but the canonical form of a pool problem
    dropped_equivalent_duplicate: int = 0  # other text, the form of an earlier kept problem
    pool_forms: int = 0      # distinct canonical forms in the training pool

    def summary(self) -> dict:
        return {"problems": len(self.records), "candidates": self.candidates,
                "dropped_seen": self.dropped_seen,
                "dropped_equivalent": self.dropped_equivalent,
                "dropped_duplicate": self.dropped_duplicate,
                "dropped_equivalent_duplicate": self.dropped_equivalent_duplicate,
                "pool_problems": self.pool_problems, "pool_forms": self.pool_forms,
                "rule": "held-out problems are distinct and none is in the training pool, "
                        "by normalised question text and by canonical form "
                        "(attnrl/data/equivalence.py: 'b + a' is 'a + b')"}


def candidate_cap(pool_problems: int) -> int:
    """How many reasoning-gym items a draw may examine."""
    return pool_problems + EXTRA_CANDIDATES


def draw_unseen(task: str, size: int, seed: int, task_kwargs: dict | None,
                pool: TrainingPool | None, what: str = "eval_size") -> UnseenDraw:
    """The first `size` distinct problems of `task` (from `seed`) whose questions are not in
    `pool` (None: no training pool, only duplicates are dropped). `what` names the setting
    in the refusal message."""
    if size < 1:
        raise UserError(f"{what} must be >= 1 to draw held-out problems; got {size}")
    seen, seen_forms = pool.keys() if pool is not None else (set(), set())
    # a file task: every line; a reasoning-gym task: lazily, up to the cap
    candidates = iter_prompts(task, None if is_file_task(task) else candidate_cap(len(seen)),
                              seed, **dict(task_kwargs or {}))
    kept, texts, forms, examined = [], set(), set(), 0
    dropped = {"seen": 0, "equivalent": 0, "duplicate": 0, "equivalent_duplicate": 0}
    for record in candidates:
        if len(kept) == size:
            break
        examined += 1
        text, form = normalize_question(record.question), canonical_form(record)
        reason = ("seen" if text in seen else "equivalent" if form in seen_forms else
                  "duplicate" if text in texts else
                  "equivalent_duplicate" if form in forms else None)
        if reason:
            dropped[reason] += 1
        else:
            texts.add(text)
            forms.add(form)
            kept.append(record)
    if len(kept) < size:
        source = task if is_file_task(task) else \
            f"{task} {task_kwargs or {}} (seed {seed}, {examined} candidates examined)"
        against = (f"not in (nor equivalent to a problem of) the {len(seen)}-problem "
                   "training pool" if pool is not None else "distinct")
        raise UserError(
            f"{what} {size}: only {len(kept)} problems of {source} are {against} "
            f"({dropped['seen']} seen in training, {dropped['equivalent']} equivalent to a "
            f"training problem, {dropped['duplicate'] + dropped['equivalent_duplicate']} "
            f"repeats); lower {what} to at most {len(kept)}, lower task_size, or use a task "
            "with more distinct problems (e.g. more terms or digits)")
    return UnseenDraw(records=kept, candidates=examined, dropped_seen=dropped["seen"],
                      dropped_duplicate=dropped["duplicate"], pool_problems=len(seen),
                      dropped_equivalent=dropped["equivalent"],
                      dropped_equivalent_duplicate=dropped["equivalent_duplicate"],
                      pool_forms=len(seen_forms))
