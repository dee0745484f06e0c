"""`attnrl train` (same --config / --key value arguments) under a launcher, recording every
rollout: each rank writes the prompt and completion token ids of each generation call and
the logged metrics it saw.

    torchrun --nproc_per_node 2 tests/trainers/_rollout_worker.py REPORT_DIR --config X ...

REPORT_DIR/rollouts_rank{R}.json   [{"step", "prompt_ids", "completion_ids", "logprobs"}]
REPORT_DIR/metrics_rank{R}.json    the trainer's log history
REPORT_DIR/engine_rank{R}.json     in-process vLLM: its executor, the device index its worker
                                   took (cuda:<local_rank> on GPUs), its world and TP groups
REPORT_DIR/evals_rank{R}.json      per held-out evaluation: {"step", "requests"}, the requests
                                   this rank's engine ran in it (vLLM: those its LLM.generate
                                   got, a tensor-parallel group's included; hf: prompts x n)

--eval_delay S (the worker's, not a job key): every generate call of a held-out evaluation
sleeps S seconds per prompt it scores, a stand-in for long generations.
--pg_timeout S (the worker's): the process group gets a timeout of S seconds for each
collective (on CPU, transformers passes accelerate no timeout: ddp_timeout is not used).
--fake_server S (the worker's): the engine is tests/trainers/delayed_engine.py's stand-in for
the vLLM server (each submitted batch generated in a thread after S seconds); the job then
sets rollout_engine vllm_server. Each record of rollouts_rank{R}.json also has "versions"
(the weight versions of its completions), REPORT_DIR/events_rank{R}.json the engine's
events, REPORT_DIR/scored_rank{R}.pt each scored batch's tensors (TRL's importance ratio
included) and REPORT_DIR/weights_v{K}.pt (rank 0) the weights pushed as version K.
"""

import json
import os
import sys
import time
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


def record_evaluations(evals: list, delay: float, vllm: bool) -> None:
    """Wraps HeldoutEvaluator.run (counting the engine's requests inside it: vLLM's
    LLM.generate when `vllm`, else HFEngine.generate) and the evaluation's
    generate-and-score step (sleeping `delay` s per prompt)."""
    from attnrl import evaluation
    from attnrl.rollout.hf import HFEngine
    from trainers.heldout import HeldoutEvaluator

    run, score, hf_generate = HeldoutEvaluator.run, evaluation._generate_and_score, \
        HFEngine.generate
    state = {"requests": None}

    def counting_run(self, trainer, *args, **kwargs):
        state["requests"] = 0
        try:
            return run(self, trainer, *args, **kwargs)
        finally:
            evals.append({"step": trainer.state.global_step, "requests": state["requests"]})
            state["requests"] = None

    def slow_score(engine, records, prompt_ids, *args, **kwargs):
        time.sleep(delay * len(prompt_ids))
        return score(engine, records, prompt_ids, *args, **kwargs)

    def counting_hf(self, prompts, sampling, *args, **kwargs):
        if state["requests"] is not None:
            state["requests"] += len(prompts) * sampling.n
        return hf_generate(self, prompts, sampling, *args, **kwargs)

    HeldoutEvaluator.run, evaluation._generate_and_score = counting_run, slow_score
    HFEngine.generate = counting_hf
    if not vllm:
        return
    from vllm import LLM

    llm_generate = LLM.generate

    def counting_vllm(self, prompts, *args, **kwargs):
        if state["requests"] is not None:
            state["requests"] += len(prompts)
        return llm_generate(self, prompts, *args, **kwargs)

    LLM.generate = counting_vllm


def process_group_timeout(timeout_s: float) -> None:
    """Every process group started in this process (accelerate's, where it starts it) gets a
    timeout of `timeout_s` seconds for each collective."""
    from datetime import timedelta

    import torch.distributed as dist

    init = dist.init_process_group

    def with_timeout(*args, **kwargs):
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        return init(*args, **kwargs)

    dist.init_process_group = with_timeout


def pop_option(rest: list[str], name: str) -> str | None:
    """The value of `name VALUE` in `rest`, removed from it (None when absent)."""
    if name not in rest:
        return None
    at = rest.index(name)
    value = rest[at + 1]
    del rest[at:at + 2]
    return value


def main(argv: list[str]) -> None:
    from trainers.cli import run_job
    from trainers.grpo import AttnGRPOTrainer
    from trainers.job import load_config, parse_overrides

    report_dir, rest = Path(argv[0]), argv[1:]
    config_path = pop_option(rest, "--config")
    calls, facts, evals = [], {}, []
    record_evaluations(evals, float(pop_option(rest, "--eval_delay") or 0),
                       vllm="vllm" in rest)
    timeout = pop_option(rest, "--pg_timeout")
    if timeout is not None:
        process_group_timeout(float(timeout))
    fake_delay = pop_option(rest, "--fake_server")
    scored, engines = [], []
    if fake_delay is not None:
        stand_in_server(float(fake_delay), report_dir, scored, engines)
    generate = AttnGRPOTrainer._generate_single_turn

    def recording(self, prompt_ids, *args, **kwargs):  # records, changes nothing
        completion_ids, logprobs = generate(self, prompt_ids, *args, **kwargs)
        if not facts and hasattr(self.engine, "llm"):
            facts.update(vllm_facts(self.engine.llm))
        calls.append({"step": self.state.global_step, "prompt_ids": prompt_ids,
                      "completion_ids": completion_ids, "logprobs": logprobs,
                      "versions": self.last_rollout_versions})
        return completion_ids, logprobs

    AttnGRPOTrainer._generate_single_turn = recording
    trainer = run_job(load_config(config_path, parse_overrides(rest)))
    rank = trainer.accelerator.process_index
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rollouts_rank{rank}.json").write_text(json.dumps(calls))
    (report_dir / f"engine_rank{rank}.json").write_text(json.dumps(facts))
    (report_dir / f"evals_rank{rank}.json").write_text(json.dumps(evals))
    (report_dir / f"metrics_rank{rank}.json").write_text(json.dumps(trainer.state.log_history))
    if fake_delay is not None:
        import torch

        events = [list(e[:2]) for e in engines[0].events]  # the job closed its engine
        (report_dir / f"events_rank{rank}.json").write_text(json.dumps(events))
        torch.save(scored, report_dir / f"scored_rank{rank}.pt")


def stand_in_server(delay: float, report_dir: Path, scored: list, engines: list) -> None:
    """The trainer's engine becomes the delayed stand-in for the vLLM server (appended to
    `engines`); every pushed version's weights are saved (rank 0) and every scored batch's
    tensors kept in `scored`."""
    import torch
    from delayed_engine import DelayedServerEngine  # beside this script (sys.path[0])

    from attnrl.rollout.hf import HFEngine
    from trainers.grpo import AttnGRPOTrainer

    def make_engine(self):
        copy = HFEngine.from_pretrained(self.model.config._name_or_path)
        engines.append(DelayedServerEngine(copy.model, copy.tokenizer, delay=delay))
        return engines[-1]

    sync, score = AttnGRPOTrainer.sync_engine_weights, \
        AttnGRPOTrainer._generate_and_score_completions

    def saving_sync(self):
        sync(self)
        if self.accelerator.is_main_process:
            report_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.engine.model.state_dict(),
                       report_dir / f"weights_v{self.engine.weight_version}.pt")

    def recording_score(self, inputs):
        output = score(self, inputs)
        if self.model.training:
            self.engine.events.append(("train", self.state.global_step))
            scored.append({"step": self.state.global_step,
                           **{k: v.detach().clone() for k, v in output.items()
                              if isinstance(v, torch.Tensor)}})
        return output

    AttnGRPOTrainer._make_engine = make_engine
    AttnGRPOTrainer.sync_engine_weights = saving_sync
    AttnGRPOTrainer._generate_and_score_completions = recording_score


if __name__ == "__main__":
    main(sys.argv[1:])
