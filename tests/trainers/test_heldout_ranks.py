"""Held-out evaluation of a 2-process training run (torchrun, gloo, CPU, transformers
engine) under a 5 s process-group timeout (the worker's --pg_timeout): each rank scores its own half of
the problems and no rank waits in a training collective while the other evaluates. Every
evaluation call sleeps 0.6 s per problem it scores (the worker's --eval_delay, a stand-in for
long generations): one rank scoring all 8 problems would hold the other in the first
training gather for about 10 s, past the timeout. The result is the one-process evaluation's,
problem by problem (same seeds, same numbers, same layout).

About 40 s on 2 shared cores (imports in both processes, about 5 s of the delay).
"""

import json
from pathlib import Path

from tests.trainers.test_deepspeed import TINY, TORCHRUN, launch

WORKER = Path(__file__).with_name("_rollout_worker.py")
SIZE, SAMPLES, MAX_TOKENS = 8, 2, 8
LAYOUT = {"task", "num_problems", "n", "temperature", "top_p", "max_tokens", "engine", "seed",
          "correct_threshold", "reward", "ks", "table_ks", "models", "heldout", "samples",
          "problems"}
"""The keys of before.json / after.json."""


def test_heldout_split_across_ranks_holds_no_collective(tiny_model_dir, tmp_path):
    from attnrl.data.unseen import TrainingPool
    from attnrl.evaluation import evaluate
    from trainers.job import CONFIG_DIR, load_config

    out, report = tmp_path / "run", tmp_path / "report"
    launch(TORCHRUN + [str(WORKER), str(report), "--config", TINY, "--eval_delay", "0.6",
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--rollout_engine", "hf", "--pg_timeout", "5",
                       "--num_generations", "4", "--per_device_train_batch_size", "2",
                       "--max_steps", "1", "--max_completion_length", "8",
                       "--eval_size", str(SIZE), "--eval_samples", str(SAMPLES),
                       "--eval_max_tokens", str(MAX_TOKENS), "--eval_after", "false"],
           tmp_path / "log.txt", timeout=600)

    # each rank's engine ran its own half of the requests, once
    evals = [json.loads((report / f"evals_rank{r}.json").read_text()) for r in range(2)]
    assert evals == [[{"step": 0, "requests": SIZE // 2 * (SAMPLES + 1)}]] * 2, evals

    # before.json: the one-process evaluation of the starting model, problem by problem
    before = json.loads((out / "heldout" / "before.json").read_text())
    assert set(before) == LAYOUT
    config = load_config(CONFIG_DIR / "tiny.yaml", {"model": str(tiny_model_dir)})
    ref = evaluate([str(tiny_model_dir)], config["task"], num_problems=SIZE, n=SAMPLES,
                   temperature=0.6, max_tokens=MAX_TOKENS, engine="hf",
                   seed=config["task_seed"] + 10_000, greedy=True,
                   task_kwargs=config["task_kwargs"], keep_texts=True,
                   pool=TrainingPool(config["task"], config["task_size"], config["task_seed"],
                                     config["task_kwargs"]))
    got, want = before["models"][0], ref["models"][0]
    for key in ("correct", "rewards", "tokens", "pass_at_k", "mean_reward", "greedy_correct",
                "greedy_accuracy"):
        assert got[key] == want[key], key
    assert [p["question"] for p in before["problems"]] == \
        [s["question"] for s in want["samples"]]
    assert [p["greedy"] for p in before["problems"]] == [s["greedy"] for s in want["samples"]]
    assert [s["texts"] for s in before["samples"]] == [s["texts"] for s in want["samples"]]
    assert len(before["problems"]) == SIZE and before["heldout"] == ref["heldout"]


def test_shares_cover_the_problems_in_order():
    """Consecutive blocks in rank order, sizes differing by at most one; a rank may get
    none."""
    from trainers.heldout_split import share

    for count in range(12):
        for world in range(1, 6):
            blocks = [share(count, world, rank) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [list(share(3, 4, rank)) for rank in range(4)] == [[0], [1], [2], []]
