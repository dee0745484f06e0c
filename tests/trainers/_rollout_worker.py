"""`attnrl train` (same --config / --key value arguments) under a launcher, recording every
rollout: each rank writes the prompt and completion token ids of each generation call and
the logged metrics it saw.

    torchrun --nproc_per_node 2 tests/trainers/_rollout_worker.py REPORT_DIR --config X ...

REPORT_DIR/rollouts_rank{R}.json   [{"step", "prompt_ids", "completion_ids", "logprobs"}]
REPORT_DIR/metrics_rank{R}.json    the trainer's log history
REPORT_DIR/engine_rank{R}.json     in-process vLLM: its executor, the device index its worker
                                   took (cuda:<local_rank> on GPUs), its world and TP groups
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def vllm_facts(llm) -> dict:
    from vllm.distributed import parallel_state

    engine = llm.llm_engine
    worker = engine.model_executor.driver_worker.worker
    world, tp = parallel_state.get_world_group(), parallel_state.get_tp_group()
    return {"executor": engine.vllm_config.parallel_config.distributed_executor_backend,
            "worker_local_rank": worker.local_rank, "worker_rank": worker.rank,
            "world_size": world.world_size, "world_rank": world.rank_in_group,
            "tp_size": tp.world_size, "tp_rank": tp.rank_in_group,
            "seed": engine.vllm_config.model_config.seed}


def main(argv: list[str]) -> None:
    from trainers.cli import run_job
    from trainers.grpo import AttnGRPOTrainer
    from trainers.job import load_config, parse_overrides

    report_dir, rest = Path(argv[0]), argv[1:]
    config_path = rest[rest.index("--config") + 1]
    rest = rest[:rest.index("--config")] + rest[rest.index("--config") + 2:]
    calls, facts = [], {}
    generate = AttnGRPOTrainer._generate_single_turn

    def recording(self, prompt_ids, *args, **kwargs):  # records, changes nothing
        completion_ids, logprobs = generate(self, prompt_ids, *args, **kwargs)
        if not facts and hasattr(self.engine, "llm"):
            facts.update(vllm_facts(self.engine.llm))
        calls.append({"step": self.state.global_step, "prompt_ids": prompt_ids,
                      "completion_ids": completion_ids, "logprobs": logprobs})
        return completion_ids, logprobs

    AttnGRPOTrainer._generate_single_turn = recording
    trainer = run_job(load_config(config_path, parse_overrides(rest)))
    rank = trainer.accelerator.process_index
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rollouts_rank{rank}.json").write_text(json.dumps(calls))
    (report_dir / f"engine_rank{rank}.json").write_text(json.dumps(facts))
    (report_dir / f"metrics_rank{rank}.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(sys.argv[1:])
