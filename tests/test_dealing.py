"""Dealing prompts and samples to ranks (gvmrl.distributed.dealing): exactly-once assignment,
token balance within one sample, seeds that depend on the global (prompt, k) only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrl.distributed.dealing import deal_samples, request_counts, sample_seeds, split_prompts

prompt_sizes = st.lists(st.integers(0, 70), min_size=1, max_size=40)


@st.composite
def allocations(draw):
    sizes = draw(prompt_sizes)
    tokens = draw(
        st.lists(st.floats(1.0, 4000.0), min_size=len(sizes), max_size=len(sizes))
    )
    return np.array(sizes), np.array(tokens), draw(st.integers(1, 9))


@settings(max_examples=300, deadline=None)
@given(allocations())
def test_every_sample_dealt_once_and_tokens_balanced_within_one_sample(case):
    sizes, tokens, world = case
    shares = deal_samples(sizes, tokens, world)
    assert len(shares) == world
    dealt = sorted(map(tuple, np.concatenate(shares).tolist())) if sizes.sum() else []
    assert dealt == [(i, k) for i, n in enumerate(sizes) for k in range(n)]  # each exactly once
    loads = [float(tokens[share[:, 0]].sum()) for share in shares]
    largest = float(tokens[sizes > 0].max()) if sizes.sum() else 0.0
    assert max(loads) - min(loads) <= largest + 1e-9


def test_a_big_prompt_is_spread_over_ranks():
    shares = deal_samples([60, 2, 2], [100.0, 100.0, 100.0], 4)
    assert [int((s[:, 0] == 0).sum()) for s in shares] == [15, 15, 15, 15]
    assert [len(s) for s in shares] == [16, 16, 16, 16]


def test_dealing_is_deterministic_and_in_prompt_order():
    a = deal_samples([5, 0, 3, 7], [12.0, 3.0, 30.0, 7.0], 3)
    b = deal_samples([5, 0, 3, 7], [12.0, 3.0, 30.0, 7.0], 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for share in a:
        assert np.array_equal(share, share[np.lexsort((share[:, 1], share[:, 0]))])


def test_request_counts():
    prompts, counts = request_counts(np.array([[0, 1], [0, 4], [3, 0]]))
    assert prompts.tolist() == [0, 3] and counts.tolist() == [2, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=50), st.integers(1, 8))
def test_split_prompts_gives_each_prompt_to_one_rank(costs, world):
    parts = split_prompts(costs, world)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(costs)))
    loads = [sum(costs[i] for i in part) for part in parts]
    assert max(loads) - min(loads) <= max(costs) + 1e-9


def test_sample_seeds_depend_on_the_global_index_only():
    seeds = sample_seeds(11, np.repeat(np.arange(50), 40), np.tile(np.arange(40), 50))
    assert np.unique(seeds).size == seeds.size  # 2000 distinct (prompt, k): distinct seeds
    # a rank computing only its own samples gets the same seeds
    assert sample_seeds(11, [7, 31], [3, 0]).tolist() == [seeds[7 * 40 + 3], seeds[31 * 40]]
    assert sample_seeds(12, 7, 3) != seeds[7 * 40 + 3]  # another iteration or phase
    # low bits look uniform: 2000 seeds mod 2 split close to evenly
    assert abs(int((seeds % 2).sum()) - 1000) < 100


@pytest.mark.parametrize(
    "args",
    [([1, -1], [1.0, 1.0], 2), ([1, 2], [1.0], 2), ([1], [np.nan], 2), ([1], [1.0], 0)],
)
def test_bad_requests_are_refused(args):
    with pytest.raises(ValueError):
        deal_samples(*args)
