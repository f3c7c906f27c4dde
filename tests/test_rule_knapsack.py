"""Knapsack-RL against hand-derived cases and a naive DP transcription of the authors' rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gvmrl.allocation_rules.knapsack import knapsack_cost, knapsack_sizes, knapsack_value


def test_value_hand_cases():
    # p = .5: p (1-p)^2 = .125; n = 2: 1 - .25 - .25 = .5 -> .0625; n = 4: 1 - 2/16 -> .109375
    assert knapsack_value(0.5, 2) == pytest.approx(0.0625)
    assert knapsack_value(0.5, 4) == pytest.approx(0.109375)
    assert knapsack_value([0.0, 1.0], 8).tolist() == [0.0, 0.0]


def test_cost_hand_cases():
    # log(.1) / log(.5) = 3.3219; log(.1) / log(.75) = 8.0039; expectation 1 / (.5 * .5) - 1 = 3
    assert knapsack_cost([0.5, 0.25]) == pytest.approx([3.3219, 8.0039], abs=1e-4)
    assert knapsack_cost([0.75], estimate="expectation") == pytest.approx([1 / (0.75 * 0.25) - 1])


def test_hand_computed_allocation():
    # p = .5, .25 (effective), 0, 1 and one unknown prompt; n = 8, budget 40, min 2, max 16.
    # Floors 2 + 2 + 2 + 2 + 8 = 16, R = 24. Costs floor(3.32) + floor(8.00) = 11 < 24: the
    # excess 13 goes to the p = 0 and unknown prompts (7 to the lower index, 6), R = 11.
    # Marginal values (c = p q^2; first extra worth v(p, 3), then c (p^(n-1) q + q^(n-1) p)):
    #   p=.5 : .09375, .015625, .0078125, .00390625, .00195...
    #   p=.25: .07910, .016479, .011536, .0084457, .0062828, .0046992, .0035212, .00264...
    # The 11 largest: 4 for p = .5 (down to .0039) and 7 for p = .25 (down to .00352).
    result = knapsack_sizes(
        [0.5, 0.25, 0.0, 1.0, 0.9],
        [True, True, True, True, False],
        40,
        default_size=8,
        min_size=2,
        max_size=16,
    )
    assert result.sizes.tolist() == [6, 9, 9, 2, 14]
    assert result.excess_redistributed and result.effective_ratio == pytest.approx(11 / 24)
    assert result.effective.tolist() == [True, True, False, False, False]


def test_no_effective_prompt_spreads_over_zero_and_unknown():
    result = knapsack_sizes([0.0, 1.0, 0.0], [True, True, True], 24, default_size=8)
    assert result.sizes.tolist() == [11, 2, 11]  # floors 2 each, 18 left over prompts 0 and 2
    result = knapsack_sizes([1.0, 1.0], [True, True], 16, default_size=8)
    assert result.sizes.tolist() == [8, 8]  # all solved: everyone back to n


def test_tight_budget_fills_the_knapsack_by_value():
    # No excess (costs 3 + 3 >= R = 2): both p = .5 prompts are equal, ties go to the lower index
    # first, and the second extra sample is worth more on the other prompt (.09375 > .015625).
    result = knapsack_sizes([0.5, 0.5], [True, True], 6, default_size=3, min_size=2, max_size=8)
    assert result.sizes.tolist() == [3, 3] and not result.excess_redistributed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(success_rates=[1.5], known=[True], budget=8), r"success_rates\[0\]"),
        (dict(success_rates=[0.5], known=[True, True], budget=8), "1-D"),
        (dict(success_rates=[0.5], known=[True], budget=1), "below"),
        (dict(success_rates=[0.5], known=[True], budget=8, min_size=0), "min_size"),
        (dict(success_rates=[0.5], known=[True], budget=8, max_size=1), "max_size"),
        (dict(success_rates=[0.5], known=[True], budget=40, max_size=16), "cannot hold"),
        (dict(success_rates=[0.5], known=[True], budget=8, confidence=1.0), "confidence"),
        (dict(success_rates=[0.5], known=[True], budget=8, cost_estimate="x"), "cost_estimate"),
    ],
)
def test_invalid_input_names_field(kwargs, match):
    kwargs.setdefault("default_size", 8)
    with pytest.raises(ValueError, match=match):
        knapsack_sizes(**kwargs)


# ---- the authors' rule, transcribed naively from their description (not their code) ----------


def _spread(sizes, targets, amount):
    for k, i in enumerate(targets):
        sizes[i] += amount // len(targets) + (1 if k < amount % len(targets) else 0)


def authors_rule(rates, known, n, min_n, max_n, alpha=0.9, allow_fallback=True):
    """Plain-Python reading of `sampling_budget_by_knapsack` with the default budget B * n,
    solved by a full DP table over (items, budget) as theirs is. Unknown prompts carry p = 0
    in their arrays, so they count among the 'p = 0' prompts."""
    batch = len(rates)
    total = batch * n
    sizes, p_seen, effective = [0] * batch, [0.0] * batch, []
    for i in range(batch):
        if known[i]:
            p_seen[i] = rates[i]
            sizes[i] = min_n
            if 0 < rates[i] < 1:
                effective.append(i)
        else:
            sizes[i] = n
    remaining = total - sum(sizes)
    zeros = [i for i in range(batch) if p_seen[i] == 0]
    if remaining > 0 and not effective:
        if zeros:
            _spread(sizes, zeros, remaining)
            return sizes
        return [n] * batch
    cost = sum(
        int(min(max_n, math.log(1 - alpha) / math.log(max(rates[i], 1 - rates[i]))))
        for i in effective
    )
    if cost < remaining and allow_fallback:
        candidates = zeros or [i for i in range(batch) if i not in effective]
        _spread(sizes, candidates, remaining - cost)
        remaining = cost
    if remaining <= 0:
        return sizes
    cap = max_n - min_n
    neg = -math.inf
    best = [[neg] * (remaining + 1) for _ in range(len(effective) + 1)]
    pick = [[0] * (remaining + 1) for _ in range(len(effective) + 1)]
    best[0][0] = 0.0
    for j, i in enumerate(effective, start=1):
        p = rates[i]
        for w in range(remaining + 1):
            best[j][w], pick[j][w] = best[j - 1][w], 0
            for k in range(1, min(cap, w) + 1):
                if best[j - 1][w - k] == neg:
                    continue
                total_n = min_n + k
                value = (1 - p**total_n - (1 - p) ** total_n) * p * (1 - p) ** 2
                if best[j - 1][w - k] + value > best[j][w]:
                    best[j][w], pick[j][w] = best[j - 1][w - k] + value, k
    used = max(w for w in range(remaining + 1) if best[len(effective)][w] > neg)
    w = used
    for j in range(len(effective), 0, -1):
        sizes[effective[j - 1]] += pick[j][w]
        w -= pick[j][w]
    _spread(sizes, effective, remaining - used)
    return sizes


def objective(rates, sizes, effective, min_n):
    return sum(knapsack_value(rates[i], sizes[i]) if sizes[i] > min_n else 0.0 for i in effective)


@st.composite
def knapsack_inputs(draw):
    batch = draw(st.integers(1, 7))
    rates = draw(st.lists(st.integers(0, 8).map(lambda k: k / 8), min_size=batch, max_size=batch))
    known = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    n = draw(st.integers(2, 8))
    min_n = draw(st.integers(1, 2))
    max_n = draw(st.integers(min_n + 1, 16))
    return rates, known, n, min_n, max_n, draw(st.booleans())


@given(knapsack_inputs())
@settings(max_examples=200, deadline=None)
def test_matches_the_authors_rule(inputs):
    rates, known, n, min_n, max_n, fallback = inputs
    effective = [i for i in range(len(rates)) if known[i] and 0 < rates[i] < 1]
    outside = [i for i in range(len(rates)) if i not in effective]
    floors = sum(n if not known[i] else min_n for i in range(len(rates)))
    remaining = len(rates) * n - floors
    cost = sum(int(min(max_n, knapsack_cost([rates[i]])[0])) for i in effective)
    # Leave out the two cases where theirs fails: an excess with no prompt outside the knapsack
    # (division by zero) and a knapsack share beyond max_n (theirs breaks its cap).
    assume(not (effective and fallback and cost < remaining and not outside))
    to_knapsack = min(cost, remaining) if (fallback and outside) else remaining
    assume(to_knapsack <= (max_n - min_n) * len(effective) or not effective)
    assume(remaining >= 0)

    theirs = authors_rule(rates, known, n, min_n, max_n, allow_fallback=fallback)
    ours = knapsack_sizes(
        rates,
        known,
        len(rates) * n,
        default_size=n,
        min_size=min_n,
        max_size=max_n,
        redistribute_excess=fallback,
    ).sizes
    assert ours.sum() == sum(theirs) == len(rates) * n
    for i in outside:  # the floors and even spreads are deterministic
        assert ours[i] == theirs[i]
    assert objective(rates, ours, effective, min_n) == pytest.approx(
        objective(rates, theirs, effective, min_n), rel=1e-12, abs=1e-15
    )
    # Both are optimal; prompts with equal p may swap sizes between them, nothing else may differ.
    for rate in {rates[i] for i in effective}:
        group = [i for i in effective if rates[i] == rate]
        assert sorted(ours[group]) == sorted(theirs[i] for i in group)


@given(knapsack_inputs(), st.integers(0, 3))
@settings(max_examples=200, deadline=None)
def test_sizes_sum_to_budget_and_respect_floors_and_caps(inputs, extra_per_prompt):
    rates, known, n, min_n, max_n, fallback = inputs
    budget = len(rates) * (n + extra_per_prompt)
    try:
        result = knapsack_sizes(
            rates,
            known,
            budget,
            default_size=n,
            min_size=min_n,
            max_size=max_n,
            redistribute_excess=fallback,
        )
    except ValueError as error:  # only when the knapsack alone cannot hold the budget
        assert "cannot hold" in str(error)
        return
    sizes, effective = result.sizes, result.effective
    assert sizes.sum() == budget
    assert np.all(sizes[effective] >= min_n) and np.all(sizes[effective] <= max_n)
    floors = np.where(np.array(known), min_n, n)
    assert np.all(sizes >= floors)
