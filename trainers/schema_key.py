"""One config key's declaration, `Key`, and the check of one value against it, `coerce`.

The declarations themselves (every key of a config) are in trainers/schema_declarations.py;
trainers/schema.py checks whole configs with them.

Arguments of Key (besides name, kinds, default and doc, the meaning shown in
docs/configuration.md):
    kinds    'int' | 'float' | 'bool' | 'str' | 'list' | 'dict' | 'int_list' | 'null' |
             'any', several joined by '|' ('int|null'); an integral float is read as an int
    choices  allowed strings (a misspelling gets "did you mean")
    ge/gt/le/lt  numeric range (bounds included / excluded)
    check    fn(value) -> problem text or None, for what the above cannot say
             (trainers/schema_checks.py holds them)
    allowed  text describing the allowed values, when `check` decides
    resume   what a change means when a run resumes (trainers/run_dir.py): 'fixed' (a
             different run: refused), 'allowed' (refused unless named in
             --allow_config_change), 'free' (bookkeeping: always accepted)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attnrl.errors import nearest


@dataclass(frozen=True)
class Key:
    """One config key: its name, kinds, default, meaning and what values it takes (the
    arguments: this module's docstring)."""

    name: str
    kinds: str
    default: Any
    doc: str
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    allowed: str = ""
    resume: str = "fixed"

    def describe(self) -> str:
        """What the key takes, e.g. 'a number > 0' or 'one of vllm, vllm_server, hf'."""
        if self.allowed:
            return self.allowed
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
            others = [k for k in self.kinds.split("|") if k not in ("str",)]
            return text + "".join(f" or {_KIND_TEXT[k]}" for k in others)
        parts = [_KIND_TEXT[k] for k in self.kinds.split("|")]
        text = " or ".join(p for p in parts if p != "null")
        for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if bound is not None:
                text += f" {op} {bound:g}"
        return text + (" or null" if "null" in self.kinds.split("|") else "")


_KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false",
              "str": "a string", "list": "a list", "dict": "a mapping", "null": "null",
              "int_list": "a list of integers", "any": "any value"}


class BadValue(Exception):
    """A value a key does not take; `problem` says why (e.g. 'is out of range')."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def coerce(key: Key, value):
    """The value as the key takes it (e.g. '1e-5' -> 1e-05 for a number, 3.0 -> 3 for an
    integer), or BadValue with the problem."""
    kinds = set(key.kinds.split("|"))
    if "any" in kinds:
        return value
    kind = _kind_of(value)
    if kind == "str" and kinds & {"float", "int"}:  # YAML 1.1 reads '1e-5' as text
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and "str" not in kinds:
            value, kind = number, "float"
    if kind == "float" and "int" in kinds and "float" not in kinds:
        if not math.isfinite(value) or value != int(value):
            raise BadValue("is not an integer")
        value, kind = int(value), "int"
    if kind == "int" and "float" in kinds and "int" not in kinds:
        kind = "float"  # an integer is a number (kept as written: 4, not 4.0)
    if kind in ("int", "float") and "str" in kinds and not kinds & {"int", "float"}:
        value, kind = str(value), "str"  # e.g. --run_name 7
    if kind == "list" and "int_list" in kinds:
        if not all(_kind_of(v) == "int" for v in value):
            raise BadValue("is not a list of integers")
        kind = "int_list"
    if kind not in kinds:
        wanted = " or ".join(_KIND_TEXT[k] for k in key.kinds.split("|"))
        raise BadValue(f"is {_KIND_TEXT.get(kind, kind)}, not {wanted}")
    if kind == "float" and not math.isfinite(value):
        raise BadValue("is not finite")
    if key.choices and kind == "str" and value not in key.choices:
        raise BadValue(f"is not a choice{nearest(value, key.choices)}")
    if kind in ("int", "float"):
        for bound, ok in ((key.ge, lambda b: value >= b), (key.gt, lambda b: value > b),
                          (key.le, lambda b: value <= b), (key.lt, lambda b: value < b)):
            if bound is not None and not ok(bound):
                raise BadValue("is out of range")
    if key.check is not None and value is not None:
        problem = key.check(value)
        if problem:
            raise BadValue(problem)
    return value

