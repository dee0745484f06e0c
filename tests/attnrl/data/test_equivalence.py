"""Equivalent problems share a canonical form (attnrl.data.equivalence), and a held-out draw
never keeps a problem equivalent to a training problem: the operand-swapped twin `b + a` of a
trained `a + b` is not "unseen"."""

import random
import re

import pytest

from attnrl.data import PromptRecord, load_prompts
from attnrl.data.equivalence import canonical_expression, canonical_form, numbers_key
from attnrl.data.unseen import TrainingPool, draw_unseen, normalize_question

ONE_DIGIT = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 problems


@pytest.mark.parametrize("a, b", [("3 + 5", "5 + 3"), ("2 * 3 + 4", "4 + 3 * 2"),
                                  ("5 - 3 - 6", "-3 + 5 - 6"), ("2 * (3 + 4)", "(4 + 3) * 2"),
                                  ("7 + 0", "0 + 7"), ("1.50 * 2", "2 * 1.5")])
def test_rewritings_share_a_form(a, b):
    assert canonical_expression(a) == canonical_expression(b) is not None


@pytest.mark.parametrize("a, b", [("5 - 3", "3 - 5"), ("6 / 2", "2 / 6"), ("2 + 3", "2 + 4"),
                                  ("2 * 3 + 4", "2 * (3 + 4)"), ("2 - 3 - 4", "2 - (3 - 4)")])
def test_different_problems_keep_different_forms(a, b):
    assert canonical_expression(a) != canonical_expression(b)


def test_not_an_expression_has_no_form():
    assert canonical_expression("how many legs") is None
    assert canonical_expression("__import__('os')") is None


def _random_expression(rng, depth=0):
    if depth > 2 or rng.random() < 0.35:
        return str(rng.randint(0, 9))
    op = rng.choice(["+", "-", "*", "/"])
    return f"({_random_expression(rng, depth + 1)} {op} {_random_expression(rng, depth + 1)})"


def _shuffle_commutative(expression, rng):
    """The same expression with the two operands of every + and * swapped at random: a
    plain rewriting, independent of the module's flattening."""
    import ast

    def walk(node):
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, (ast.Add, ast.Mult)) and rng.random() < 0.5:
                left, right = right, left
            return ast.BinOp(left=left, op=node.op, right=right)
        return node
    return ast.unparse(walk(ast.parse(expression, mode="eval").body))


def _value(expression):
    try:
        return round(eval(expression, {"__builtins__": {}}), 9)  # digits and operators only
    except ZeroDivisionError:
        return None


def test_same_form_means_same_value_on_random_expressions():
    """Reference check on 2000 random expressions: a commutative shuffle keeps the form, and
    any two expressions with one form have one value (the form never joins two problems
    with different answers)."""
    rng = random.Random(0)
    by_form = {}
    for _ in range(2000):
        expression = _random_expression(rng)
        form = canonical_expression(expression)
        assert canonical_expression(_shuffle_commutative(expression, rng)) == form
        value = _value(expression)
        if value is not None:
            assert by_form.setdefault(form, value) == value


def _record(question, answer, expression=None):
    metadata = {"entry": {"metadata": {"expression": expression} if expression else
                          {"animals": {}}}}
    return PromptRecord(question=question, answer=answer, source="t", index=0,
                        metadata=metadata)


def test_keys_by_source():
    assert canonical_form(_record("What is 3 + 5?", "8", "3 + 5")) == \
        canonical_form(_record("Compute 5 + 3.", "8", "5 + 3"))
    # a reasoning-gym task without an expression: the numbers with the answer
    a = _record("3 cats and 5 dogs: how many legs?", "32")
    b = _record("5 dogs and 3 cats: how many legs?", "32")
    assert canonical_form(a) == canonical_form(b) == numbers_key(a.question, "32")
    assert canonical_form(a) != canonical_form(_record("3 cats and 6 dogs?", "36"))
    # a text task: the normalised question
    text = PromptRecord(question="What is  3 + 5?", answer="8", source="f.jsonl", index=0)
    assert canonical_form(text) == "text:what is 3 + 5?"


def _operands(question):
    return re.search(r"(-?\d+) ([+-]) (-?\d+) =", question).groups()


def test_main_job_pool_twins_are_not_held_out():
    """The structure that broke the old draw: in the main job's pool (64 draws of two
    one-digit terms) many `a + b` have their twin `b + a` outside the pool's questions. The
    text-only rule kept those twins as unseen; the draw now drops them, and says how many."""
    pool = TrainingPool("chain_sum", size=64, seed=0, kwargs=ONE_DIGIT)
    pool_text = pool.questions()
    twins = set()
    for record in pool.records():
        a, op, b = _operands(record.question)
        twin = record.question.replace(f"{a} {op} {b} =", f"{b} {op} {a} =")
        if op == "+" and a != b and normalize_question(twin) not in pool_text:
            twins.add(normalize_question(twin))
    assert len(twins) >= 5
    # the old rule: the first 128 text-unseen candidates hold some of these twins
    old, keys = [], set()
    for record in load_prompts("chain_sum", size=2000, seed=10_000, **ONE_DIGIT):
        key = normalize_question(record.question)
        if key not in pool_text and key not in keys and len(old) < 128:
            keys.add(key)
            old.append(key)
    assert len(set(old) & twins) >= 5
    draw = draw_unseen("chain_sum", 107, 10_000, ONE_DIGIT, pool)
    held = {normalize_question(r.question) for r in draw.records}
    assert not held & twins and not held & pool_text
    for record in draw.records:  # independent of canonical_form: swap the operands by hand
        a, op, b = _operands(record.question)
        if op == "+":
            swapped = record.question.replace(f"{a} + {b} =", f"{b} + {a} =")
            assert normalize_question(swapped) not in pool_text
            assert swapped == record.question or normalize_question(swapped) not in held
    summary = draw.summary()
    assert summary["dropped_equivalent"] > 0 and summary["pool_forms"] == 48
    # 155 forms exist (55 sums up to order, 100 differences): 107 are outside the pool
    with pytest.raises(Exception, match="only 107 problems"):
        draw_unseen("chain_sum", 108, 10_000, ONE_DIGIT, pool)


def test_committed_main_job_records_are_equivalence_free():
    """The main job's committed held-out records (benchmarks/results/main_job): every
    problem's question and canonical form (its operands swapped by hand for sums) are
    outside the training pool rebuilt from the run's own recorded config."""
    import json
    from pathlib import Path

    import yaml

    folder = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "main_job"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    rows = [json.loads(x) for x in (folder / "problems.jsonl").read_text().splitlines() if x]
    pool = TrainingPool.from_config(config)
    texts = pool.questions()
    assert len(rows) == config["eval_size"] == 107
    for row in rows:
        a, op, b = _operands(row["question"])
        forms = {normalize_question(row["question"])}
        if op == "+":
            forms.add(normalize_question(row["question"].replace(f"{a} + {b} =",
                                                                 f"{b} + {a} =")))
        assert not forms & texts, row["question"]
