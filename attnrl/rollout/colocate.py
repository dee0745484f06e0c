"""In-process vLLM inside a multi-process trainer ("colocate"): one engine per rank, on the
rank's own device.

vLLM's default in-process executor builds a one-process world and binds local device 0, so
on an 8-GPU node every rank's engine lands on GPU 0. Under a launcher (torchrun,
deepspeed, accelerate) the engine must instead join the launcher's world through vLLM's
`external_launcher` executor: it reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT, reuses the initialized torch.distributed group, and puts the worker on device
LOCAL_RANK. With `tensor_parallel_size` = k > 1, the ranks [0..k-1], [k..2k-1], ... each
form one tensor-parallel engine: every rank of a group must submit the same requests (the
engine gathers its group's prompts, see VLLMEngine._generate_tp) and the group's engines
share one seed.
"""

from __future__ import annotations

import os

from attnrl.errors import UserError

LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "SLURM_LOCALID")
"""Where launchers put a process's index on its node (torchrun / deepspeed / accelerate,
Open MPI, MPICH, srun), in the order read."""


def local_rank() -> int | None:
    """This process's index on its node, from the launcher's environment; None if unset."""
    for name in LOCAL_RANK_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def distributed_layout() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of this process: from torch.distributed when it is
    initialized (the local rank from the launcher's environment, never the global rank:
    on a second node they differ), else (0, 0, 1). UserError when several processes run
    and no launcher variable gives the local rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    local = local_rank()
    if local is None:
        if world > 1:
            raise UserError(f"rank {rank} of {world}: the launcher set none of "
                            f"{', '.join(LOCAL_RANK_VARS)}, so this process's device on its "
                            "node is unknown; start it with torchrun / deepspeed / accelerate "
                            "(or export LOCAL_RANK)")
        local = 0
    return rank, local, world


def tp_groups(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """Consecutive rank groups of size `tensor_parallel_size` (the grouping vLLM's own
    tensor-parallel groups use). UserError unless the size divides the world."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise UserError(f"vllm_tensor_parallel_size {tensor_parallel_size} must be >= 1 and "
                        f"divide the number of trainer processes ({world_size})")
    return [list(range(start, start + tensor_parallel_size))
            for start in range(0, world_size, tensor_parallel_size)]


def colocate_kwargs(tensor_parallel_size: int, seed: int) -> tuple[dict, object]:
    """`LLM(...)` keyword arguments that place this rank's engine on its own device, and the
    torch.distributed subgroup of its tensor-parallel group (None when
    tensor_parallel_size == 1). Sets the launcher variables vLLM reads, from the
    initialized process group. A collective when tensor_parallel_size > 1 (every rank must
    call it). The engine seed is `seed + group index`: equal inside a TP group (its ranks
    must sample identically), different across groups."""
    import torch.distributed as dist

    rank, local_rank, world = distributed_layout()
    groups = tp_groups(world, tensor_parallel_size)
    if world == 1:  # nothing to place: vLLM's own one-process executor
        return {"seed": seed}, None
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise UserError("colocated vLLM under several processes needs MASTER_PORT set by "
                        "the launcher (torchrun / deepspeed / accelerate set it)")
    tp_group = None
    if tensor_parallel_size > 1:
        tp_group, _ = dist.new_subgroups_by_enumeration(groups)
    kwargs = {"distributed_executor_backend": "external_launcher",
              "seed": seed + rank // tensor_parallel_size}
    return kwargs, tp_group
