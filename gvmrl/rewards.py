"""Training rewards: a sample's score from its verifier grade, optionally with stricter checks.

Final-answer correctness is the verifiable reward of the paper. On the built-in arithmetic task it
has a known flaw: with answers in 0..99, a model that slips in an intermediate step still lands on
the right answer by luck often enough that, on 5-6-step chains, most accepted samples of the
pretrained built-in model contain a false equation (measured: 6 of 21 accepted 5-step and 4 of 11
6-step samples were fully right). Rejection sampling then trains on wrong arithmetic, most of all on
hard prompts, where GVM puts its samples. "answer+arithmetic" also requires every equation the
response states (`a+b=c`, `a-b=c`, `a*b=c`) to be true: still checkable without a reference
solution. Held-out evaluation always reports plain final-answer accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gvmrl.verify import Grade

_EQUATION = re.compile(r"(\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def stated_arithmetic_holds(text: str) -> bool:
    """True when every `a op b = c` equation in `text` is arithmetically right."""
    return all(_APPLY[op](int(a), int(b)) == int(c) for a, op, b, c in _EQUATION.findall(text))


def _answer(grade: Grade, text: str) -> float:
    return grade.score


def _answer_and_arithmetic(grade: Grade, text: str) -> float:
    return grade.score if grade.score > 0 and stated_arithmetic_holds(text) else 0.0


REWARDS: dict[str, Callable[[Grade, str], float]] = {
    "answer": _answer,
    "answer+arithmetic": _answer_and_arithmetic,
}
