"""Rollouts of a 2-process training run (torchrun, gloo, CPU) whose per-rank batches split
GRPO groups (num_generations 4, 2 rows per rank): every group's completions are distinct,
with the transformers engine and with in-process vLLM colocated on each rank (vLLM's
external_launcher executor, tensor parallel 1 and 2). At temperature 0.7 TRL's
importance-sampling correction runs on the engines' log-probs and, on the first step
(engine and trainer hold the same weights), its per-token ratio is 1.

Each run takes 40-120 s on 2 shared cores (imports, vLLM start-up in both processes).
"""

import json
import math
from pathlib import Path

import pytest

from tests.trainers.test_deepspeed import TINY, TORCHRUN, launch

WORKER = Path(__file__).with_name("_rollout_worker.py")
NUM_GENERATIONS = 4


def run(tiny_model_dir, tmp_path, engine, *extra) -> tuple[list, list, list]:
    out, report = tmp_path / "run", tmp_path / "report"
    launch(TORCHRUN + [str(WORKER), str(report), "--config", TINY,
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--rollout_engine", engine, "--num_generations", str(NUM_GENERATIONS),
                       "--per_device_train_batch_size", "2", "--max_steps", "2",
                       "--temperature", "0.7", "--rollout_kv_cache_gib", "0.0625",
                       "--max_completion_length", "16", "--save_steps", "1000", *extra],
           tmp_path / "log.txt", timeout=600)
    calls = [json.loads((report / f"rollouts_rank{r}.json").read_text()) for r in range(2)]
    metrics = [json.loads((report / f"metrics_rank{r}.json").read_text()) for r in range(2)]
    engines = [json.loads((report / f"engine_rank{r}.json").read_text()) for r in range(2)]
    return calls, metrics, engines


def assert_groups_distinct(calls, steps: int = 2) -> None:
    """Rank 0's rows then rank 1's form each generation batch (TRL's split); every group of
    NUM_GENERATIONS rows holds one prompt (split over both ranks) and distinct completions."""
    assert len(calls[0]) == len(calls[1]) == steps  # one generation per step
    for call0, call1 in zip(*calls):
        assert call0["step"] == call1["step"]
        assert len(call0["prompt_ids"]) == len(call1["prompt_ids"]) == 2
        prompts = call0["prompt_ids"] + call1["prompt_ids"]
        completions = call0["completion_ids"] + call1["completion_ids"]
        for g in range(0, len(prompts), NUM_GENERATIONS):
            group = slice(g, g + NUM_GENERATIONS)
            assert len({tuple(p) for p in prompts[group]}) == 1, "rows are not one group"
            texts = [tuple(c) for c in completions[group]]
            assert len(set(texts)) == NUM_GENERATIONS, \
                f"step {call0['step']}: group {g // NUM_GENERATIONS} repeats completions {texts}"


def assert_first_step_ratio_is_one(metrics) -> None:
    """TRL's IS metrics were logged (the correction ran) and, on step 1, sampler and
    trainer log-probs agree: the per-token ratio is 1 within float32 kernel differences."""
    first = next(row for row in metrics[0] if row.get("step") == 1 and
                 "sampling/importance_sampling_ratio/mean" in row)
    assert first["sampling/sampling_logp_difference/max"] < 1e-4, first
    for key in ("min", "mean", "max"):
        assert math.isclose(first[f"sampling/importance_sampling_ratio/{key}"], 1.0,
                            abs_tol=1e-3), first  # a sequence ratio: up to 16 tokens


def test_hf_engine_split_groups_two_processes(tiny_model_dir, tmp_path):
    calls, metrics, _ = run(tiny_model_dir, tmp_path, "hf")
    assert_groups_distinct(calls)
    assert_first_step_ratio_is_one(metrics)


def test_vllm_colocated_split_groups_two_processes(tiny_model_dir, tmp_path):
    """Each rank's engine joined the launcher's world through external_launcher and its
    worker took the rank's local device index (on GPUs: cuda:<LOCAL_RANK>, not cuda:0)."""
    calls, metrics, engines = run(tiny_model_dir, tmp_path, "vllm")
    for rank, facts in enumerate(engines):
        assert facts["executor"] == "external_launcher", facts
        assert facts["worker_local_rank"] == facts["worker_rank"] == rank, facts
        assert facts["world_size"] == 2 and facts["world_rank"] == rank, facts
        assert facts["tp_size"] == 1, facts
    assert engines[0]["seed"] != engines[1]["seed"]
    assert_groups_distinct(calls)
    assert_first_step_ratio_is_one(metrics)


@pytest.mark.slow
def test_vllm_tensor_parallel_two_processes(tiny_model_dir, tmp_path):
    """One tensor-parallel engine over both ranks (same seed, same requests): each rank
    still gets its own rows, distinct within every group."""
    calls, metrics, engines = run(tiny_model_dir, tmp_path, "vllm",
                                  "--vllm_tensor_parallel_size", "2")
    for rank, facts in enumerate(engines):
        assert facts["executor"] == "external_launcher", facts
        assert facts["tp_size"] == 2 and facts["tp_rank"] == rank, facts
    assert engines[0]["seed"] == engines[1]["seed"]
    assert_groups_distinct(calls)
    assert_first_step_ratio_is_one(metrics)


@pytest.mark.slow
def test_vllm_tensor_parallel_with_heldout_evaluation(tiny_model_dir, tmp_path):
    """Held-out evaluation before and after training with one tensor-parallel engine over
    both ranks: each rank submits its own half of the problems, the engine gathers them and
    runs each request once (4 problems x (2 samples + greedy) = 12, not 12 per rank). Both
    evaluations are written, and training rollouts are as without it."""
    calls, _, engines = run(tiny_model_dir, tmp_path, "vllm",
                            "--vllm_tensor_parallel_size", "2", "--eval_size", "4",
                            "--eval_samples", "2", "--eval_max_tokens", "8")
    assert all(facts["tp_size"] == 2 for facts in engines)
    assert_groups_distinct(calls)
    for rank in range(2):  # each rank's LLM: the group's requests, before and after
        evals = json.loads((tmp_path / "report" / f"evals_rank{rank}.json").read_text())
        assert evals == [{"step": 0, "requests": 12}, {"step": 2, "requests": 12}], evals
    for kind in ("before", "after"):
        result = json.loads((tmp_path / "run" / "heldout" / f"{kind}.json").read_text())
        assert len(result["problems"]) == 4, result
