"""The allocation rule against hand-computed cases and independent brute-force references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from gvmrl.allocation import allocate

# accept rates on the grid of N' = 8 pre-samples, as the training loop produces them
rates = st.integers(0, 8).map(lambda k: k / 8)
norms = st.one_of(st.just(0.0), st.floats(1e-6, 100.0))


@st.composite
def prompt_stats(draw, min_size=1, max_size=40):
    n = draw(st.integers(min_size, max_size))
    p = draw(st.lists(rates, min_size=n, max_size=n))
    g = draw(st.lists(norms, min_size=n, max_size=n))
    return np.array(p), np.array(g)


def naive_gvm_share(p, g, budget, alpha=1e-3, beta=2.0):
    """budget * w_i / sum(w), written as a plain loop from the paper's formula."""
    w = []
    for pi, gi in zip(p, g):
        w.append(0.0 if pi == 0 or gi == 0 else gi / math.sqrt(pi + alpha / pi ** (beta - 1)))
    total = sum(w)
    return [budget * wi / total for wi in w] if total > 0 else [0.0] * len(w)


def test_hand_computed_case():
    # w = 1/sqrt(p + 1e-3/p): p=.5 -> 1.41140, p=.25 -> 1.98413, p=0 -> 0, p=1 -> 0.99950;
    # sum 4.39503.
    # shares of 10: 3.2114, 4.5145, 0, 2.2742 -> floors 3, 4, 0, 2 (sum 9); the largest remainder
    # (.5145, prompt 1) takes the last sample.
    sizes = allocate([0.5, 0.25, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], 10)
    assert sizes.tolist() == [3, 5, 0, 2]
    assert sizes.dtype == np.int64


def test_alpha_zero_is_unregularised():
    # w = G / sqrt(p): (2/sqrt(.25), 1/sqrt(1)) = (4, 1) -> 16 and 4 of 20.
    assert allocate([0.25, 1.0], [2.0, 1.0], 20, alpha=0.0).tolist() == [16, 4]


def test_beta_changes_regulariser():
    # beta=3: w = G / sqrt(p + alpha / p^2); with alpha=0.5, p=.5 -> 1/sqrt(2.5), p=1 -> 1/sqrt(1.5)
    w = np.array([1 / math.sqrt(2.5), 1 / math.sqrt(1.5)])
    expected = 100 * w / w.sum()  # 43.65, 56.35
    sizes = allocate([0.5, 1.0], [1.0, 1.0], 100, alpha=0.5, beta=3.0)
    assert np.all(np.abs(sizes - expected) < 1) and sizes.tolist() == [44, 56]
    # beta=2 (default): p + alpha / p = .5 + 1 = 1 + .5, equal weights -> 50 each
    assert allocate([0.5, 1.0], [1.0, 1.0], 100, alpha=0.5).tolist() == [50, 50]


def test_uniform_ties_go_to_lower_index():
    assert allocate([0.1, 0.9, 0.0], [5.0, 0.0, 1.0], 8, rule="uniform").tolist() == [3, 3, 2]


def test_drop_above():
    # p=.9 is dropped; the rest split 12 as w = 1/sqrt(.5+.002)=1.4114, 1/sqrt(.25+.004)=1.9841
    assert allocate([0.5, 0.25, 0.9], [1.0, 1.0, 1.0], 12, drop_above=0.8).tolist() == [5, 7, 0]


def test_min_expected_accepts_drops_then_renormalises():
    # proportional shares of 20 (w = G/sqrt(p+1e-3/p)): p=.125,G=1 -> w=2.7735; p=.5,G=1 -> 1.4114;
    # p=1,G=4 -> 3.9980; sum 8.1829. Expected accepts: .125*6.78=0.85, .5*3.45=1.72, 1*9.77=9.77.
    # With k=1 only the first is dropped, and the other two share 20 as 1.4114:3.9980
    # -> 5.22, 14.78.
    sizes = allocate([0.125, 0.5, 1.0], [1.0, 1.0, 4.0], 20, min_expected_accepts=1.0)
    assert sizes.tolist() == [0, 5, 15]


def test_caps_redistribute_proportionally():
    # weights (uniform rule with a cap is trivial, so use gvm with alpha=0): G/sqrt(p) = 8, 2, 1, 1.
    # Uncapped shares of 24: 16, 4, 2, 2. Cap 10 -> prompt 0 takes 10, the other 14 are shared
    # 2:1:1 -> 7, 3.5, 3.5 -> 7, 4, 3 (the tied remainder goes to the lower index).
    sizes = allocate([0.25, 0.25, 1.0, 1.0], [4.0, 1.0, 1.0, 1.0], 24, alpha=0.0, max_size=10)
    assert sizes.tolist() == [10, 7, 4, 3]


def test_floor_applies_only_to_live_prompts():
    # G/sqrt(p) = 8, 1 and a dead prompt; floor 3 lifts prompt 1 from 10*1/9 to 3, prompt 0 gets 7.
    sizes = allocate([0.25, 1.0, 0.0], [4.0, 1.0, 1.0], 10, alpha=0.0, min_size=3)
    assert sizes.tolist() == [7, 3, 0]


def test_all_zero_weights_warn_and_allocate_nothing():
    with pytest.warns(UserWarning, match="zero weight"):
        sizes = allocate([0.0, 0.0], [1.0, 1.0], 16)
    assert sizes.tolist() == [0, 0]


def test_caps_too_small_for_live_prompts_fill_and_warn():
    with pytest.warns(UserWarning, match="unallocated"):
        sizes = allocate([0.5, 0.0, 0.0], [1.0, 1.0, 1.0], 9, max_size=4)
    assert sizes.tolist() == [4, 0, 0]


def test_uniform_share_mixes_in_an_even_split():
    # alpha=0: G/sqrt(p) = 4, 1, 0 -> rule shares .8, .2, 0. With lambda = .25 over all three
    # prompts: .75 * (.8, .2, 0) + .25 / 3 = .68333, .23333, .08333 -> 82, 28, 10 of 120. The
    # prompt whose pre-samples all failed (p = 0) keeps samples.
    sizes = allocate([0.25, 1.0, 0.0], [2.0, 1.0, 0.0], 120, alpha=0.0, uniform_share=0.25)
    assert sizes.tolist() == [82, 28, 10]


def test_uniform_share_leaves_filtered_prompts_out():
    # drop_above=.9 removes prompt 1: .75 * (1, 0, 0) + .25 * (.5, 0, .5) = .875, 0, .125
    sizes = allocate(
        [0.25, 1.0, 0.0], [2.0, 1.0, 0.0], 120, alpha=0.0, drop_above=0.9, uniform_share=0.25
    )
    assert sizes.tolist() == [105, 0, 15]


def test_uniform_share_with_no_live_prompt_splits_evenly():
    assert allocate([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 9, uniform_share=0.5).tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(accept_rates=[0.5, 1.5], grad_norms=[1, 1], budget=4), r"accept_rates\[1\]"),
        (dict(accept_rates=[0.5, float("nan")], grad_norms=[1, 1], budget=4), r"accept_rates\[1\]"),
        (dict(accept_rates=[0.5, 0.5], grad_norms=[1, -1], budget=4), r"grad_norms\[1\]"),
        (dict(accept_rates=[0.5, 0.5], grad_norms=[float("inf"), 1], budget=4), r"grad_norms\[0\]"),
        (dict(accept_rates=[0.5], grad_norms=[1, 1], budget=4), "length mismatch"),
        (dict(accept_rates=[0.5], grad_norms=[1], budget=-1), "budget"),
        (dict(accept_rates=[0.5, 0.5], grad_norms=[1, 1], budget=9, max_size=4), "max_size"),
        (dict(accept_rates=[0.5, 0.5], grad_norms=[1, 1], budget=3, min_size=2), "min_size"),
        (dict(accept_rates=[0.5], grad_norms=[1], budget=3, rule="nope"), "rule"),
        (dict(accept_rates=[0.5], grad_norms=[1], budget=3, drop_above=2.0), "drop_above"),
        (dict(accept_rates=[0.5], grad_norms=[1], budget=3, uniform_share=1.0), "uniform_share"),
        (dict(accept_rates=[0.5], grad_norms=[1], budget=3, uniform_share=-0.1), "uniform_share"),
    ],
)
def test_invalid_input_names_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate(**kwargs)


@given(prompt_stats(), st.integers(0, 2000))
@settings(max_examples=200, deadline=None)
def test_sum_exact_and_within_one_of_share(stats, budget):
    p, g = stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = allocate(p, g, budget)
    share = naive_gvm_share(p, g, budget)
    if sum(share) == 0:
        assert sizes.sum() == 0
        return
    assert sizes.sum() == budget
    assert np.all(sizes >= 0)
    assert np.all(np.abs(sizes - np.array(share)) < 1 + 1e-9)
    assert np.all(sizes[(p == 0) | (g == 0)] == 0)


@given(prompt_stats(), st.integers(0, 2000), st.floats(0.05, 0.95))
@example((np.array([0.0, 0.0]), np.array([1.0, 0.0])), 100, 0.3)  # no live prompt: even split
@settings(max_examples=200, deadline=None)
def test_uniform_share_is_a_floor_and_the_rest_follows_the_rule(stats, budget, share):
    """Every prompt gets at least floor(share * budget / B); each stays within 1 of its share of
    the mixed weights, computed here from the paper's formula."""
    p, g = stats
    sizes = allocate(p, g, budget, uniform_share=share)
    assert sizes.sum() == budget
    assert np.all(sizes >= math.floor(share * budget / len(p) + 1e-9))
    weights = (1 - share) * np.array(naive_gvm_share(p, g, 1.0)) + share / len(p)
    mixed = budget * weights / weights.sum()
    assert np.all(np.abs(sizes - mixed) < 1 + 1e-9)


@given(prompt_stats(min_size=2), st.integers(1, 500), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_permutation_equivariance(stats, budget, rnd):
    p, g = stats
    perm = list(range(len(p)))
    rnd.shuffle(perm)
    perm = np.array(perm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        permuted_after = allocate(p, g, budget)[perm]
        permuted_before = allocate(p[perm], g[perm], budget)
    # Ties in the rounding go to the lower index by design, so prompts whose remainder is tied
    # with another's may swap a sample; every other prompt keeps its size, and the sizes agree
    # as a multiset.
    share = np.array(naive_gvm_share(p, g, budget))[perm]
    frac = np.round(share - np.floor(share), 9)
    _, inverse, counts = np.unique(frac, return_inverse=True, return_counts=True)
    untied = counts[inverse] == 1
    assert np.array_equal(permuted_after[untied], permuted_before[untied])
    assert sorted(permuted_after) == sorted(permuted_before)


@given(prompt_stats(), st.integers(0, 300))
@settings(max_examples=200, deadline=None)
def test_uniform_spread_at_most_one(stats, budget):
    p, g = stats
    sizes = allocate(p, g, budget, rule="uniform")
    assert sizes.sum() == budget
    assert sizes.max() - sizes.min() <= 1


def water_fill_by_bisection(w, total, lower, upper):
    """Independent reference: bisection on c for sum(clip(c w, lower, upper)) = total."""
    lo, hi = 0.0, 1.0
    while np.clip(hi * w, lower, upper).sum() < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(mid * w, lower, upper).sum() < total:
            lo = mid
        else:
            hi = mid
    return np.clip(hi * w, lower, upper)


@given(prompt_stats(min_size=2), st.data())
@settings(max_examples=150, deadline=None)
def test_caps_and_floors_match_water_filling(stats, data):
    p, g = stats
    live = (p > 0) & (g > 0)
    assume(live.sum() >= 1)
    n_live = int(live.sum())
    min_size = data.draw(st.integers(0, 3))
    max_size = data.draw(st.integers(max(min_size, 1), 30))
    assume(min_size * len(p) <= max_size * n_live)
    budget = data.draw(st.integers(min_size * len(p), max_size * n_live))
    sizes = allocate(p, g, budget, min_size=min_size, max_size=max_size)
    assert sizes.sum() == budget
    assert np.all(sizes[~live] == 0)
    assert np.all(sizes[live] <= max_size) and np.all(sizes[live] >= min_size)
    w = np.array(naive_gvm_share(p, g, 1.0))[live]
    reference = water_fill_by_bisection(w, budget, min_size, max_size)
    assert np.all(np.abs(sizes[live] - reference) < 1 + 1e-6)
