"""The built-in arithmetic task: answers checked by evaluating the problem text independently."""

from __future__ import annotations

import re

import pytest

from gvmrl.builtin.task import (
    DIFFICULTIES,
    MAX_VALUE,
    SPLIT_SIZES,
    builtin_problems,
    builtin_split,
    generate_problems,
)
from gvmrl.records import PromptRecord

NESTED = re.compile(r"Compute ([0-9+\-*()]+)")
ASSIGNMENT = re.compile(r"([a-z])=([a-z]|[0-9]+)(?:([+\-*])([0-9]+))?")
EQUATION = re.compile(r"([0-9]+)([+\-*])([0-9]+)=([0-9]+)\.")


def evaluate_problem(text: str) -> int:
    """Evaluate a problem without the generator's code: Python eval or a tiny interpreter."""
    nested = NESTED.fullmatch(text)
    if nested:
        return eval(nested.group(1))  # only digits, + - * and parentheses (checked by the regex)
    *assignments, question = text.split("; ")
    env: dict[str, int] = {}
    for assignment in assignments:
        name, left, op, right = ASSIGNMENT.fullmatch(assignment).groups()
        value = env[left] if left.isalpha() else int(left)
        env[name] = value if op is None else eval(f"{value}{op}{right}")
    target = re.fullmatch(r"what is ([a-z])\?", question).group(1)
    return env[target]


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_answers_match_independent_evaluation(difficulty):
    for problem in generate_problems(400, seed=3, difficulty=difficulty):
        assert int(problem.answer) == evaluate_problem(problem.problem), problem


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_solutions_are_correct_chains_within_the_knobs(difficulty):
    knobs = DIFFICULTIES[difficulty]
    for problem in generate_problems(400, seed=5, difficulty=difficulty):
        body, boxed = problem.solution.rsplit(" ", 1)
        assert boxed == f"\\boxed{{{problem.answer}}}"
        equations = EQUATION.findall(body)
        assert " ".join(f"{a}{op}{b}={c}." for a, op, b, c in equations) == body
        assert len(equations) == problem.steps
        assert knobs.min_steps <= problem.steps <= knobs.max_steps
        previous = None
        for a, op, b, c in equations:
            a, b, c = int(a), int(b), int(c)
            assert c == eval(f"{a}{op}{b}") and 0 <= c <= MAX_VALUE
            assert previous is None or a == previous  # each step continues from the last value
            if op == "*":
                assert a <= knobs.multiply_below and 1 <= b <= 9
            else:
                assert 1 <= b <= knobs.max_operand
            previous = c
        assert previous == int(problem.answer)


def test_generation_is_deterministic_and_seeded():
    assert generate_problems(50, seed=11) == generate_problems(50, seed=11)
    assert generate_problems(50, seed=11) != generate_problems(50, seed=12)


def test_default_mixes_both_forms_and_all_step_counts():
    problems = generate_problems(600, seed=0)
    assert {p.steps for p in problems} == set(range(1, 7))
    assert any(p.problem.startswith("Compute ") for p in problems)
    assert any(p.problem.endswith("?") for p in problems)
    operands = {int(b) for p in problems for _, _, b, _ in EQUATION.findall(p.solution)}
    assert operands <= set(range(1, 10))


def test_hard_is_wider_than_default():
    hard = generate_problems(600, seed=0, difficulty="hard")
    assert max(p.steps for p in hard) == 8
    assert any(
        int(b) >= 10 for p in hard for _, op, b, _ in EQUATION.findall(p.solution) if op != "*"
    )


def test_unknown_difficulty_raises():
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate_problems(1, 0, difficulty="nope")


def test_builtin_splits_are_fixed_sized_distinct_and_disjoint():
    train, test = builtin_problems("default", "train"), builtin_problems("default", "test")
    assert len(train) == SPLIT_SIZES["train"] and len(test) == SPLIT_SIZES["test"]
    train_texts, test_texts = {p.problem for p in train}, {p.problem for p in test}
    assert len(train_texts) == len(train) and len(test_texts) == len(test)
    assert not train_texts & test_texts
    assert {p.steps for p in test} == set(range(1, 7))  # difficulties mixed in the test split


def test_builtin_split_records_are_deterministic():
    records = builtin_split("hard", "test")
    assert len(records) == SPLIT_SIZES["test"]
    assert all(isinstance(r, PromptRecord) for r in records)
    assert records[7].id == "builtin-hard-test-00007"
    assert len({r.id for r in records}) == len(records)
    builtin_problems.cache_clear()
    assert builtin_split("hard", "test") == records  # regenerated from the seeds, not cached
    assert {r.problem for r in records}.isdisjoint(
        p.problem for p in builtin_problems("hard", "train")
    )
