"""`attnrl train` (the same --config / --key value arguments) run under a launcher, then one
more weight sync; each rank writes what its rollout engine holds and what DeepSpeed ran.

    torchrun --nproc_per_node 2 tests/trainers/_ds_worker.py REPORT_DIR --config X.yaml ...

REPORT_DIR/engine_rank{R}.safetensors  the engine's weights after the final sync
REPORT_DIR/rank{R}.json                world size, ZeRO stage, offload devices, optimizer
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def deepspeed_facts(trainer) -> dict:
    engine = trainer.model_wrapped

    def device(offload):
        value = getattr(offload, "device", None)
        value = getattr(value, "value", value)  # an enum member or its string
        return None if value in (None, "none") else value

    import torch.distributed
    from deepspeed import comm

    params = list(engine.module.parameters())
    return {
        "world_size": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend(),
        "shm_comm_op_built": getattr(comm.comm.cdb, "shm_comm_op", None) is not None,
        # ZeRO-3: the elements this rank holds vs the full model
        "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                           for p in params),
        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage() if engine.zero_optimization() else 0,
        "offload_optimizer": device(engine.zero_offload_optimizer()),
        "offload_param": device(engine.zero_offload_param()),
        "zero_optimizer": type(engine.optimizer).__name__,
        "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
    }


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file

    from trainers.cli import run_job
    from trainers.job import load_config, parse_overrides

    report_dir, rest = Path(argv[0]), argv[1:]
    config_path = rest[rest.index("--config") + 1]
    rest = rest[:rest.index("--config")] + rest[rest.index("--config") + 2:]
    trainer = run_job(load_config(config_path, parse_overrides(rest)))
    trainer.sync_engine_weights()  # a collective under ZeRO-3: every rank gathers
    rank = trainer.accelerator.process_index
    state = {k: v.detach().contiguous() for k, v in trainer.engine.model.state_dict().items()}
    report_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, report_dir / f"engine_rank{rank}.safetensors")
    facts = {"rank": rank, "global_step": trainer.state.global_step, **deepspeed_facts(trainer)}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1:])
