"""The built-in synthetic reasoning task: multi-step arithmetic chains with worked solutions.

A problem is a chain of `steps` operations applied to a start value, shown in one of two surface
forms, and solved by one equation per step ending in `\\boxed{N}`:

    Compute (((3+5)*2)-4)              ->  3+5=8. 8*2=16. 16-4=12. \\boxed{12}
    a=3; b=a+5; c=b*2; d=c-4; what is d?  ->  (the same solution)

Why this task: a character-level model of ~1M parameters learns it in a few CPU minutes, the
number of steps is a difficulty knob (per-prompt accept rates spread from ~0 to ~1, which is what
makes sample allocation matter), and answers are integers that the verifier grades exactly.
Every intermediate value stays in 0..99 and multiplication is used only while the running value
is a one-digit number (times-table facts), which keeps the task learnable quickly.
Everything is deterministic from seeds; the train and test splits of a difficulty are disjoint.
"""

from __future__ import annotations

import functools
import random
import string
import zlib
from dataclasses import dataclass

from gvmrl.records import PromptRecord

MAX_VALUE = 99  # every intermediate value lies in 0..MAX_VALUE
SPLIT_SIZES = {"train": 20_000, "test": 512}


@dataclass(frozen=True)
class Difficulty:
    """Knobs of one problem distribution."""

    min_steps: int
    """Fewest operations in a chain."""
    max_steps: int
    """Most operations in a chain; the count is drawn uniformly in [min_steps, max_steps]."""
    max_operand: int
    """Operands of + and - (and the start value) are drawn from 1..max_operand."""
    two_digit_prob: float
    """Probability that an operand of + or - is drawn from 10..max_operand instead of 1..9."""
    multiply_below: int
    """Multiplication (by 1..9) is allowed only while the running value is <= this."""


# "default" is what the built-in model is pretrained on; "hard" widens the spread (longer chains,
# two-digit operands) for the benchmark's harder mix, so many of its prompts have low accept rates.
DIFFICULTIES: dict[str, Difficulty] = {
    "default": Difficulty(
        min_steps=1, max_steps=6, max_operand=9, two_digit_prob=0.0, multiply_below=9
    ),
    "hard": Difficulty(
        min_steps=2, max_steps=8, max_operand=30, two_digit_prob=0.3, multiply_below=9
    ),
}


@dataclass(frozen=True)
class TaskProblem:
    """One generated problem with its reference answer and worked solution."""

    problem: str
    """The question shown to the model, e.g. `Compute ((3+5)*2)`."""
    answer: str
    """The final integer as a string, e.g. `16`."""
    solution: str
    """Step-by-step solution ending in `\\boxed{answer}`; the supervised target of pretraining."""
    steps: int
    """Number of operations in the chain."""

    def to_record(self, record_id: str) -> PromptRecord:
        return PromptRecord(id=record_id, problem=self.problem, answer=self.answer)


@dataclass(frozen=True)
class _Step:
    op: str
    operand: int
    before: int
    after: int


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _draw_operand(rng: random.Random, difficulty: Difficulty) -> int:
    if difficulty.max_operand > 9 and rng.random() < difficulty.two_digit_prob:
        return rng.randint(10, difficulty.max_operand)
    return rng.randint(1, min(9, difficulty.max_operand))


def _draw_chain(rng: random.Random, difficulty: Difficulty) -> tuple[int, list[_Step]]:
    """Draw a start value and a chain of steps keeping every value in 0..MAX_VALUE.

    The operation is drawn uniformly among those feasible for the running value; the operand is
    redrawn until the result stays in range (always possible: 1 is a valid operand of + below
    MAX_VALUE and of - above 0).
    """
    start = _draw_operand(rng, difficulty)
    value, chain = start, []
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        ops = [
            op
            for op, ok in (
                ("+", value < MAX_VALUE),
                ("-", value > 0),
                ("*", value <= difficulty.multiply_below),
            )
            if ok
        ]
        op = rng.choice(ops)
        while True:
            operand = rng.randint(1, 9) if op == "*" else _draw_operand(rng, difficulty)
            after = _apply(op, value, operand)
            if 0 <= after <= MAX_VALUE:
                break
        chain.append(_Step(op, operand, value, after))
        value = after
    return start, chain


def _nested_form(start: int, chain: list[_Step]) -> str:
    expression = str(start)
    for step in chain:
        expression = f"({expression}{step.op}{step.operand})"
    return f"Compute {expression}"


def _variables_form(start: int, chain: list[_Step]) -> str:
    names = string.ascii_lowercase
    lines = [f"a={start}"]
    for i, step in enumerate(chain, start=1):
        lines.append(f"{names[i]}={names[i - 1]}{step.op}{step.operand}")
    return "; ".join(lines) + f"; what is {names[len(chain)]}?"


SURFACE_FORMS = {"nested": _nested_form, "variables": _variables_form}


def _solution(chain: list[_Step]) -> str:
    equations = " ".join(f"{s.before}{s.op}{s.operand}={s.after}." for s in chain)
    return f"{equations} \\boxed{{{chain[-1].after}}}"


def generate_problems(n: int, seed: int, *, difficulty: str = "default") -> list[TaskProblem]:
    """Draw `n` independent problems (repeats possible) from a seeded `random.Random`.

    Each problem picks its number of steps uniformly, then its surface form uniformly.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {sorted(DIFFICULTIES)}")
    knobs = DIFFICULTIES[difficulty]
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        start, chain = _draw_chain(rng, knobs)
        form = rng.choice(sorted(SURFACE_FORMS))
        problems.append(
            TaskProblem(
                problem=SURFACE_FORMS[form](start, chain),
                answer=str(chain[-1].after),
                solution=_solution(chain),
                steps=len(chain),
            )
        )
    return problems


def _distinct(seed: int, difficulty: str, count: int, exclude: frozenset[str]) -> list[TaskProblem]:
    """The first `count` distinct problems of the seeded stream that are not in `exclude`.

    Short chains have few distinct problems (a 1-step chain has under a thousand), so the
    split holds proportionally fewer of them than the uniform draw of steps would give.
    """
    seen, kept = set(exclude), []
    batch_seed = seed
    while len(kept) < count:
        for problem in generate_problems(count, batch_seed, difficulty=difficulty):
            if problem.problem not in seen:
                seen.add(problem.problem)
                kept.append(problem)
                if len(kept) == count:
                    break
        batch_seed += 1_000_003  # a fresh stream if one batch had too many repeats
    return kept


def _split_seed(name: str, split: str) -> int:
    return zlib.crc32(f"gvmrl-builtin/{name}/{split}".encode())


@functools.cache
def builtin_problems(name: str = "default", split: str = "train") -> tuple[TaskProblem, ...]:
    """The fixed problems of a built-in split (with solutions), e.g. for supervised pretraining.

    The test split is drawn first and the train split excludes its problems, so the two are
    disjoint. Sizes are SPLIT_SIZES.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_SIZES)}")
    test = _distinct(_split_seed(name, "test"), name, SPLIT_SIZES["test"], frozenset())
    if split == "test":
        return tuple(test)
    excluded = frozenset(p.problem for p in test)
    return tuple(_distinct(_split_seed(name, split), name, SPLIT_SIZES[split], excluded))


def builtin_split(name: str = "default", split: str = "train") -> list[PromptRecord]:
    """The prompts of a built-in split as records with ids like `builtin-default-test-00007`."""
    return [
        p.to_record(f"builtin-{name}-{split}-{i:05d}")
        for i, p in enumerate(builtin_problems(name, split))
    ]
