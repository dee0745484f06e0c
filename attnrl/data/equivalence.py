"""When two problems are the same problem: canonical forms for held-out checks.

Two problems that differ only in how they are written (`3 + 5` and `5 + 3`) are one problem
for a held-out claim: a model trained on one has been trained on the other. `canonical_form`
gives each problem a key that such rewritings share [D]:

    source                         key
    reasoning-gym, metadata with   the expression with commutative operands sorted:
      an 'expression'              + and - chains become a sorted list of signed terms,
                                   * chains a sorted list of factors; '-', '/' and other
                                   operators keep their order ("expr:...")
    other reasoning-gym tasks      the multiset of numbers in the question with the gold
                                   answer ("numbers:...") [issue rule; may join two
                                   problems that differ only in words, never splits a pair
                                   that differs only in order]
    JSONL files / gsm8k            the normalised question ("text:...")

    canonical_form(record)         # record: attnrl.data.PromptRecord
    canonical_expression("3 + 5")  # "(+3 +5)"  (also the key of "5 + 3")
"""

from __future__ import annotations

import ast
import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_text(text: str) -> str:
    """Case folded, runs of white space made one space."""
    return " ".join(str(text).casefold().split())


def _number(value) -> str:
    """A numeric literal in one spelling (3, 3.0 -> '3'; 2.50 -> '2.5')."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _signed_terms(node, sign: int, out: list) -> None:
    """Flatten a +/- chain into (sign, canonical term) pairs."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        _signed_terms(node.left, sign, out)
        _signed_terms(node.right, sign if isinstance(node.op, ast.Add) else -sign, out)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        _signed_terms(node.operand, -sign if isinstance(node.op, ast.USub) else sign, out)
    else:
        out.append(("+" if sign > 0 else "-") + _canonical(node))


def _factors(node, out: list) -> None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        _factors(node.left, out)
        _factors(node.right, out)
    else:
        out.append(_canonical(node))


def _canonical(node) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return _number(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) or \
            isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        terms: list = []
        _signed_terms(node, 1, terms)
        return "(" + " ".join(sorted(terms)) + ")" if len(terms) > 1 else \
            ("(" + terms[0] + ")")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        factors: list = []
        _factors(node, factors)
        return "(* " + " ".join(sorted(factors)) + ")"
    if isinstance(node, ast.BinOp):
        return f"({type(node.op).__name__} {_canonical(node.left)} {_canonical(node.right)})"
    raise ValueError(f"not an arithmetic expression node: {ast.dump(node)}")


def canonical_expression(expression: str) -> str | None:
    """The canonical key of an arithmetic expression; None when it does not parse as one."""
    text = str(expression).replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        return _canonical(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


def numbers_key(question: str, answer: str) -> str:
    """The multiset of numbers in the question, with the normalised gold answer."""
    numbers = sorted(_number(n) for n in _NUMBER.findall(str(question)))
    return "numbers:" + ",".join(numbers) + "=" + normalize_text(answer)


def _gym_metadata(record) -> dict:
    entry = (record.metadata or {}).get("entry") or {}
    return entry.get("metadata") or {}


def canonical_form(record) -> str:
    """The equivalence key of a PromptRecord (see the module docstring)."""
    metadata = _gym_metadata(record)
    if metadata:
        expression = metadata.get("expression")
        if expression is not None:
            key = canonical_expression(expression)
            if key is not None:
                return "expr:" + key
        return numbers_key(record.question, record.answer)
    return "text:" + normalize_text(record.question)
