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


def _layout_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo processes, as the second 'node' of 2 x 1 would see it: the local rank
    comes from the launcher's LOCAL_RANK (0 on both nodes), never from the global rank."""
    import json
    import os

    import torch.distributed as dist

    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                 "SLURM_LOCALID"):
        os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        try:
            distributed_layout()
            missing = "no error"
        except UserError as err:
            missing = str(err)
        os.environ["LOCAL_RANK"] = "0"
        layout = distributed_layout()
    finally:
        dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({"missing": missing, "layout": layout}, handle)


def test_local_rank_comes_from_the_launcher_never_the_global_rank(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_layout_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert "LOCAL_RANK" in report["missing"] and f"rank {rank} of 2" in report["missing"]
        assert report["layout"] == [rank, 0, 2]
