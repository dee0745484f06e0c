"""pass@k estimator vs brute force; `attnrl eval` end to end (HF and vLLM engines)."""

import itertools
import json
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl.cli import main
from attnrl.errors import UserError
from attnrl.evaluation import pass_at_k, pass_at_k_curve, table_ks


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_estimator_equals_enumeration_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_edge_cases():
    for n in (1, 5, 256):
        assert all(pass_at_k(n, 0, k) == 0.0 for k in range(1, n + 1))
        assert all(pass_at_k(n, n, k) == 1.0 for k in range(1, n + 1))
        assert all(pass_at_k(n, c, n) == 1.0 for c in range(1, n + 1))
        assert pass_at_k(n, 1, 1) == pytest.approx(1 / n, abs=1e-15)
    with pytest.raises(UserError):
        pass_at_k(4, 5, 1)
    with pytest.raises(UserError):
        pass_at_k(4, 2, 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1024), st.data())
def test_stable_for_large_n_against_exact_rationals(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-9)


def test_curve_is_the_mean_over_problems_and_table_ks():
    correct = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    curve = pass_at_k_curve(correct, [1, 2, 4])
    for k, value in curve.items():
        assert value == pytest.approx(sum(brute_force(4, sum(r), k) for r in correct) / 3)
    assert table_ks(8) == [1, 2, 4, 8] and table_ks(6) == [1, 2, 4, 6] and table_ks(1) == [1]


def _check_outputs(out, rescore):
    """passk.json's pass@k equals the estimator on its recorded correctness, the PNG is an
    image, and re-scoring the saved texts reproduces the recorded rewards."""
    import matplotlib.image

    result = json.loads((out / "passk.json").read_text())
    image = matplotlib.image.imread(out / "passk.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for m in result["models"]:
        assert len(m["correct"]) == result["num_problems"]
        assert all(len(row) == result["n"] for row in m["correct"])
        for k in result["ks"]:
            expected = sum(pass_at_k(result["n"], sum(row), k) for row in m["correct"]) / len(
                m["correct"])
            assert m["pass_at_k"][str(k)] == pytest.approx(expected, abs=1e-12)
        mine = [s for s in samples if s["model"] == m["model"]]
        for p, sample in enumerate(mine):
            assert rescore(p, sample) == m["rewards"][p]
            assert m["correct"][p] == [int(r >= 1.0) for r in m["rewards"][p]]
    return result


def test_eval_end_to_end_hf(tiny_model_dir, tmp_path, capsys):
    """GSM8K-format file whose first gold answer is the model's own greedy answer: greedy
    accuracy must be exactly 1/2 (second gold is wrong on purpose)."""
    from attnrl.answers.math_answer import extract_math_answer, math_reward
    from attnrl.data import apply_chat_template, load_jsonl
    from attnrl.rollout import SamplingConfig, make_engine

    questions = ["What is 21 + 18?", "Alice has 3 apples and buys 9 more. How many?"]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n"
                            for q in questions))
    engine = make_engine("hf", str(tiny_model_dir))
    records = apply_chat_template(load_jsonl(path), engine.tokenizer)
    greedy = engine.generate([r.prompt for r in records],
                             SamplingConfig(n=1, temperature=0.0, max_tokens=12))
    answer, _ = extract_math_answer(greedy[0][0].text)
    assert answer is not None, greedy[0][0].text
    path.write_text(json.dumps({"question": questions[0], "answer": answer}) + "\n"
                    + json.dumps({"question": questions[1], "answer": "no such answer"}) + "\n")

    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", str(path), "--num-problems",
               "2", "-n", "4", "--max-tokens", "12", "--engine", "hf", "--greedy",
               "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "pass@1" in table and "pass@4" in table and "greedy" in table
    # without --config it says which problems it scored (they may be a run's training set)
    assert f"scoring the first 2 lines of {path}" in captured.err

    golds = [answer, "no such answer"]
    result = _check_outputs(out, lambda p, s: math_reward(
        [""] * len(s["texts"]), s["texts"], answer=[golds[p]] * len(s["texts"])))
    assert result["reward"] == "math"
    assert result["models"][0]["greedy_accuracy"] == 0.5


@pytest.mark.slow
def test_eval_end_to_end_vllm(tiny_model_dir, tmp_path):
    from attnrl.answers.gym_answer import gym_reward
    from attnrl.data import load_gym_task

    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", "chain_sum",
               "--num-problems", "2", "-n", "2", "--max-tokens", "8", "--engine", "vllm",
               "--out", str(out)])
    assert rc == 0
    records = load_gym_task("chain_sum", size=2, seed=0)
    result = _check_outputs(out, lambda p, s: gym_reward(
        [""] * len(s["texts"]), s["texts"], metadata=[records[p].metadata] * len(s["texts"])))
    assert result["engine"] == "vllm" and result["reward"] == "gym"
    assert result["models"][0]["greedy_accuracy"] is None


@pytest.mark.parametrize("args, message", [
    (["--task", "chain_summ"], "no task 'chain_summ'"),
    (["--task", "missing/file.jsonl"], "is not an existing .jsonl file"),
    (["-n", "0"], "must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, args, message):
    rc = main(["eval", "--model", str(tiny_model_dir), "--engine", "hf", "--out",
               str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_model_path_exits_2(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--engine", "hf", "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1, err


def test_eval_takes_the_task_settings_of_a_training_config(tmp_path):
    """`attnrl eval --config RUN/config.yaml` evaluates the trained task (its task_kwargs,
    instruction, system prompt) on problems held out by seed; flags override."""
    from attnrl.evaluation import HELDOUT_SEED_OFFSET, task_settings

    repo = Path(__file__).resolve().parents[2]
    default = task_settings(str(repo / "configs" / "default.yaml"), None, None, None)
    config = yaml.safe_load((repo / "configs" / "default.yaml").read_text())
    pool = default.pop("pool")
    assert default == {"task": "chain_sum", "instruction": "", "system_prompt": None,
                       "task_kwargs": config["task_kwargs"], "seed": HELDOUT_SEED_OFFSET,
                       # the run's held-out evaluation: size, samples, temperature, length
                       "num_problems": config["eval_size"], "n": 2, "temperature": None,
                       "max_tokens": 64,
                       "engine": "vllm", "fields": {}}
    # the run's training pool, whose questions are never evaluated
    assert (pool.task, pool.size, pool.seed, pool.kwargs) == \
        ("chain_sum", config["task_size"], 0, config["task_kwargs"])
    (tmp_path / "config.yaml").write_text("task: gsm8k:test\ntask_seed: 3\n")
    assert task_settings(str(tmp_path), None, None, None)["seed"] == 3 + HELDOUT_SEED_OFFSET
    mixed = task_settings(str(tmp_path), "chain_sum", "{min_terms: 3}", 7)
    assert mixed["task"] == "chain_sum" and mixed["task_kwargs"] == {"min_terms": 3}
    assert mixed["seed"] == 7
    # another --task drops the config's task_kwargs (they are chain_sum's)
    other = task_settings(str(repo / "configs" / "default.yaml"), "countdown", None, None)
    assert other["task"] == "countdown" and other["task_kwargs"] is None
    (tmp_path / "config.yaml").write_text("task: gsm8k\n")  # held out: the test split
    assert task_settings(str(tmp_path), None, None, None)["task"] == "gsm8k:test"
    plain = task_settings(None, None, None, None)
    assert plain["task"] == "chain_sum" and plain["seed"] == 0 and plain["task_kwargs"] is None
    # a run on a data file with mapped fields: its held-out file is read through them
    (tmp_path / "config.yaml").write_text("task: train.csv\neval_task: test.parquet\n"
                                          "question_field: problem\n")
    mapped = task_settings(str(tmp_path), None, None, None)
    assert mapped["task"] == "test.parquet" and mapped["fields"] == {"question_field": "problem"}
    assert mapped["pool"].kwargs == {"question_field": "problem"}


def test_large_eval_request_gets_an_estimate():
    from attnrl.evaluation import request_note

    # the README's eval before: 2 models x 32 problems x 16 samples x 512 tokens
    note = request_note(2, 32, 16, 512, greedy=False, engine="vllm")
    assert "524,288 generated tokens" in note and "min" in note and "\n" not in note
    assert request_note(2, 32, 4, 96, greedy=False, engine="vllm") is None  # README's now


def test_eval_with_a_run_config_generates_the_trained_task(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(
        "task: chain_sum\ntask_seed: 0\ntask_kwargs: {min_terms: 3, max_terms: 3, "
        "min_digits: 1, max_digits: 1}\ninstruction: ''\n")
    rc = main(["eval", "--config", str(tmp_path / "config.yaml"), "--model",
               str(tiny_model_dir), "--engine", "hf", "--num-problems", "3", "-n", "2",
               "--max-tokens", "4", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "o" / "passk.json").read_text())
    assert result["task_kwargs"]["min_terms"] == 3 and result["seed"] == 10_000
    samples = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").open()]
    # three terms: two operators in every question
    assert all(sum(s["question"].count(op) for op in "+-") >= 2 for s in samples)
    assert '{"min_terms": 3' in capsys.readouterr().out


def test_a_bare_gym_task_says_it_scores_the_training_seed():
    from attnrl.evaluation import which_problems_note

    line = which_problems_note("chain_sum", 32, 0)
    assert "from seed 0" in line and "task_seed 0 trains on" in line and "--config RUN" in line
    assert "\n" not in line
