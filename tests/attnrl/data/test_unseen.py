"""Held-out problems are never training problems: compared by question text and canonical
form against the whole training pool, deduplicated, refused when too few exist
(attnrl.data.unseen)."""

import json
from pathlib import Path

import pytest

from attnrl.data import load_prompts
from attnrl.data.equivalence import canonical_form
from attnrl.data.unseen import TrainingPool, draw_unseen, normalize_question
from attnrl.errors import UserError

ONE_DIGIT = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 problems


def questions(records):
    return [normalize_question(r.question) for r in records]


def pool_questions(task, size, seed, kwargs):
    return set(questions(load_prompts(task, size=size, seed=seed, **kwargs)))


def test_normalize_question_folds_case_and_space():
    assert normalize_question("  What is\t2 +  2?\n") == normalize_question("what is 2 + 2?")
    assert normalize_question("2 + 2") != normalize_question("2 + 3")


SHIPPED = sorted(Path(__file__).resolve().parents[3].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_job_heldout_shares_no_question_with_its_training_pool(path):
    """Every shipped job with a held-out evaluation (the main job first): each held-out
    question is absent from the full pool the sampler draws from (task_size problems, not
    only the prompts used), none repeats, and `attnrl eval --config` draws the same ones."""
    from attnrl.evaluation import task_settings
    from trainers.heldout_keys import heldout_settings
    from trainers.job import load_config
    from trainers.schema import resolve

    config = resolve(load_config(path))
    settings = heldout_settings(config)
    if not settings.enabled:
        pytest.skip(f"{path.name} has no held-out evaluation")
    draw = settings.draw()
    held = questions(draw.records)
    pool = pool_questions(config["task"], config["task_size"], config["task_seed"],
                          config["task_kwargs"] or {})
    assert len(held) == config["eval_size"] == len(set(held))
    assert not set(held) & pool
    forms = [canonical_form(r) for r in draw.records]
    assert len(set(forms)) == len(forms)
    assert not set(forms) & TrainingPool.from_config(config).keys()[1]
    assert draw.summary()["problems"] == config["eval_size"]
    from_eval = task_settings(str(path), None, None, None)
    again = draw_unseen(from_eval["task"], config["eval_size"], from_eval["seed"],
                        from_eval["task_kwargs"], from_eval["pool"])
    assert questions(again.records) == held


@pytest.mark.parametrize("eval_seed", [1, 0, 5])
def test_neighbouring_seeds_are_no_guard_text_is(eval_seed):
    """reasoning-gym seeds item i from seed + i: eval_seed = task_seed + 1 repeats almost
    the whole pool, and eval_seed = task_seed repeats all of it. The draw drops them."""
    kwargs = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    pool = TrainingPool("chain_sum", size=64, seed=0, kwargs=kwargs)
    raw = questions(load_prompts("chain_sum", size=64, seed=eval_seed, **kwargs))
    seen = pool.questions()
    assert sum(q in seen for q in raw) >= 54  # the problem: most raw items are training items
    draw = draw_unseen("chain_sum", 64, eval_seed, kwargs, pool)
    held = questions(draw.records)
    assert len(set(held)) == 64 and not set(held) & seen
    assert draw.dropped_seen >= 54 and draw.candidates == 64 + draw.dropped_seen + \
        draw.dropped_duplicate + draw.dropped_equivalent + draw.dropped_equivalent_duplicate


def test_task_size_above_the_seed_offset():
    """A pool larger than the default offset (10000) overlaps eval_seed's items; all of them
    are dropped and the held-out set is still full and disjoint."""
    kwargs = {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 2}
    pool = TrainingPool("chain_sum", size=10_100, seed=0, kwargs=kwargs)
    draw = draw_unseen("chain_sum", 32, 10_000, kwargs, pool)
    held = questions(draw.records)
    assert len(set(held)) == 32 and not set(held) & pool.questions()
    assert draw.dropped_seen >= 90  # items 10000..10099 are pool items


def test_draw_is_prefix_stable_and_deterministic():
    pool = TrainingPool("chain_sum", size=16, seed=0, kwargs=ONE_DIGIT)
    small = questions(draw_unseen("chain_sum", 20, 10_000, ONE_DIGIT, pool).records)
    large = questions(draw_unseen("chain_sum", 60, 10_000, ONE_DIGIT, pool).records)
    assert large[:20] == small  # more candidates never change the earlier problems


def test_too_few_unseen_problems_is_refused_with_the_count():
    """chain_sum with two one-digit terms has 200 problems: a 512-problem pool leaves too few
    for 128 held-out problems; the message says how many there are and what to change."""
    pool = TrainingPool("chain_sum", size=512, seed=0, kwargs=ONE_DIGIT)
    distinct_left = 200 - len(pool.questions())
    with pytest.raises(UserError) as err:
        draw_unseen("chain_sum", 128, 10_000, ONE_DIGIT, pool)
    message = str(err.value)
    assert "\n" not in message and "eval_size 128" in message
    count = int(message.split("only ")[1].split()[0])
    assert 0 < count <= distinct_left
    assert "lower eval_size" in message and "task_size" in message
    # exactly that many can be drawn
    assert len(draw_unseen("chain_sum", count, 10_000, ONE_DIGIT, pool).records) == count


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_heldout_drops_training_questions_and_repeats(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)])
    held = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "what is 3 +  1?", "answer": "4"},          # a training question
        {"question": "What is 50 + 1?", "answer": "51"},
        {"question": "What is 50 + 1?", "answer": "51"},         # a repeat
        {"question": "What is 60 + 1?", "answer": "61"},
        {"question": "What is 9 + 1?", "answer": "10"}])         # a training question
    pool = TrainingPool(str(train), size=10)
    draw = draw_unseen(str(held), 2, 0, None, pool)
    assert [r.question for r in draw.records] == ["What is 50 + 1?", "What is 60 + 1?"]
    assert (draw.dropped_seen, draw.dropped_duplicate) == (1, 1)
    with pytest.raises(UserError, match="only 2 problems"):
        draw_unseen(str(held), 3, 0, None, pool)
    # the pool is what the sampler can draw: the first task_size lines only
    assert len(draw_unseen(str(held), 3, 0, None, TrainingPool(str(train), size=3))
               .records) == 3


def test_gsm8k_test_split_is_disjoint_from_train():
    pool = TrainingPool("gsm8k:train", size=7473)
    draw = draw_unseen("gsm8k:test", 1319, 0, None, pool)  # all of test: none in train
    assert not set(questions(draw.records)) & pool.questions()


def test_job_refuses_before_writing_anything(tmp_path):
    """A job whose held-out set cannot be filled fails before output_dir is created."""
    from trainers.cli import run_job
    from trainers.job import load_config

    out = tmp_path / "run"
    config = load_config(None, {"task_size": 512, "eval_size": 128, "output_dir": str(out),
                                "task_kwargs": ONE_DIGIT,
                                "model": "smollm2"})
    with pytest.raises(UserError, match="eval_size 128: only"):
        run_job(config)
    assert not out.exists()
