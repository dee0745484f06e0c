"""Held-out evaluation split across a job's ranks: each rank scores its own share of the
problems on its own rollout engine, then one gather brings every share to rank 0.

No rank waits in a training collective while another evaluates: every rank evaluates, and
the only collective is the final gather (each rank reaches it after its own share; shares
differ by at most one problem). Under tensor parallelism every rank still submits only its
own share: the engine gathers its group's prompts and runs each request once
(attnrl.rollout.vllm_engine.VLLMEngine._generate_tp). Sample j of problem p keeps the seed
sample_seed(seed, p, j) of the whole problem list (attnrl.evaluation.score_rows), so the
result is the one-rank evaluation's, whatever the number of ranks.
"""

from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def share(count: int, world: int, rank: int) -> range:
    """The problem indices of `rank`: consecutive blocks in rank order, the first
    count % world ranks one problem more (a rank may get none)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def score_share(engine, records, prompt_ids, samples: int, settings, top_p: float) -> dict:
    """This rank's rows (attnrl.evaluation.score_rows) of its share of the problems; a rank
    without problems still calls the engine (a tensor-parallel group generates together)."""
    from attnrl.evaluation import score_rows

    rank, world = rank_and_world()
    mine = share(len(records), world, rank)
    s = settings
    return score_rows(engine, records[mine.start:mine.stop], prompt_ids[mine.start:mine.stop],
                      samples, s.temperature, top_p, s.max_tokens, s.seed, greedy=True,
                      first=mine.start)


def gather_shares(part: dict) -> list[dict] | None:
    """Every rank's part, in rank order, on rank 0 (one gather_object); None on the other
    ranks. One process: [part]."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [part]
    parts = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return parts


def merge_shares(parts: list[dict], samples: int) -> dict:
    """The evaluation entry (attnrl.evaluation.entry_from_rows) of the parts joined in rank
    order, i.e. problem order; 'generate_seconds': the slowest rank's."""
    from attnrl.evaluation import entry_from_rows

    rows = [row for part in parts for row in part["rows"]]
    greedy = [row for part in parts for row in part["greedy_rows"]]
    return entry_from_rows(rows, greedy, samples, max(part["seconds"] for part in parts))
