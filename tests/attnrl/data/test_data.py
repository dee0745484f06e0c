"""Prompt datasets: reasoning-gym tasks, GSM8K JSONL, chat templates."""

import json

import pytest

from attnrl.data import apply_chat_template, gsm8k_path, load_gym_task, load_jsonl, load_prompts
from attnrl.errors import UserError

GSM8K_TEST = gsm8k_path("test")


def test_gsm8k_jsonl_records_carry_gold_answers():
    records = load_jsonl(GSM8K_TEST, limit=50)
    assert len(records) == 50
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:50]]
    for record, row in zip(records, rows):
        assert record.question == row["question"]
        assert record.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert record.answer.lstrip("-").replace(".", "").isdigit()


def test_jsonl_line_without_question_names_line_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "answer": "#### 1"}\n{"prompt": "q2"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*no 'question' field"):
        load_jsonl(path)
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_gym_task_is_deterministic_and_scored_by_its_own_answers():
    import reasoning_gym

    a = load_gym_task("chain_sum", size=8, seed=3)
    b = load_gym_task("chain_sum", size=8, seed=3)
    assert [r.question for r in a] == [r.question for r in b]
    assert [r.question for r in load_gym_task("chain_sum", size=8, seed=4)] != \
        [r.question for r in a]
    dataset = reasoning_gym.create_dataset("chain_sum", size=8, seed=3)
    for record in a:
        entry = record.metadata["entry"]
        assert dataset.score_answer(record.answer, entry) == 1.0


def test_unknown_gym_task_suggests_nearest():
    with pytest.raises(UserError, match="no task 'chain_summ'.*did you mean 'chain_sum'"):
        load_gym_task("chain_summ")


def test_chat_template_applied_when_tokenizer_has_one(tiny_tokenizer):
    records = apply_chat_template(load_gym_task("chain_sum", size=2, seed=0), tiny_tokenizer)
    for r in records:
        assert r.prompt.startswith("<|im_start|>user\n" + r.question)
        assert r.prompt.endswith("<|im_start|>assistant\n")
    plain = apply_chat_template(load_gym_task("chain_sum", size=1, seed=0),
                                _without_template(tiny_tokenizer))
    assert plain[0].prompt.endswith("Answer:") and "<|im_start|>" not in plain[0].prompt


def _without_template(tokenizer):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = None
    return clone
