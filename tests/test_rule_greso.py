"""GRESO skipping against hand cases and a naive transcription of the authors' rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrl.allocation_rules.greso import (
    adapt_exploration_base,
    decide_skips,
    easy_and_hard_targets,
    skip_probability,
    zero_variance_shares,
)
from gvmrl.allocation_rules.history import PromptHistory


def test_skip_probability_hand_cases():
    # keep = max(p^z, .01): .5^3 = .125 -> skip .875; .5^7 = .0078 -> floor .01 -> skip .99;
    # z = 0 on both -> always kept; p_hard = .8, z = 2 -> keep .64
    probs = skip_probability([3, 7, 0, 0], [0, 0, 0, 2], p_easy=0.5, p_hard=0.8)
    assert probs == pytest.approx([0.875, 0.99, 0.0, 0.36])


def test_adaptation_steps_and_clips():
    assert adapt_exploration_base(0.5, 0.1, 0.25 / 3) == pytest.approx(0.49)  # too many: skip more
    assert adapt_exploration_base(0.5, 0.05, 0.25 / 3) == pytest.approx(0.51)
    assert adapt_exploration_base(0.055, 0.5, 0.1) == 0.05
    assert adapt_exploration_base(0.945, 0.0, 0.1) == 0.95
    assert easy_and_hard_targets(0.25) == pytest.approx((0.25 / 3, 0.5 / 3))


def test_zero_variance_shares():
    # groups: all 4 right, 0 of 4, 2 of 4, not drawn, 3 of 3
    assert zero_variance_shares([4, 0, 2, 0, 3], [4, 4, 4, 0, 3]) == (0.5, 0.25)
    assert zero_variance_shares([0], [0]) == (0.0, 0.0)


def test_decisions_are_seeded_and_never_skip_a_fresh_prompt():
    probs = skip_probability([0, 2, 5, 0], [0, 0, 0, 1], 0.5, 0.5)
    first = decide_skips(probs, np.random.default_rng(3))
    assert np.array_equal(first, decide_skips(probs, np.random.default_rng(3)))
    assert not first[0]
    many = np.stack([decide_skips(probs, np.random.default_rng(s)) for s in range(2000)])
    # skip rates .75, .96875, .5 within 4 standard errors
    assert many.mean(axis=0)[1:] == pytest.approx([0.75, 0.96875, 0.5], abs=4 * 0.5 / 44)
    assert not many[:, 0].any()


def authors_skip_probability(trace, p_easy, p_hard):
    """Plain reading of `easy_probabilistic_skip` then `hard_probabilistic_skip` on a reward
    trace (per-visit mean rewards, oldest first): the probability that either test skips."""
    if not trace:
        return 0.0
    count = 0
    for reward in reversed(trace):
        if reward < 0.98:
            break
        count += 1
    skip_easy = 1 - max(p_easy**count, 0.01)
    if trace[-1] > 0.11:
        skip_hard = 0.0
    else:
        count = 0
        for reward in reversed(trace):
            if reward > 0.11:
                break
            count += 1
        skip_hard = 1 - max(p_hard**count, 0.01)
    return 1 - (1 - skip_easy) * (1 - skip_hard)


@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 8), st.integers(1, 8)), max_size=8),
        min_size=1,
        max_size=6,
    ),
    st.floats(0.05, 0.95),
    st.floats(0.05, 0.95),
)
@settings(max_examples=200, deadline=None)
def test_history_streaks_reproduce_the_authors_rule(visits_per_prompt, p_easy, p_hard):
    """Streaks kept by PromptHistory give the skip probability the authors compute from the
    whole reward trace (0/1 rewards, up to 8 samples a visit)."""
    history = PromptHistory()
    traces = []
    for pid, visits in enumerate(visits_per_prompt):
        trace = []
        for accepted, samples in visits:
            accepted = min(accepted, samples)
            history.update([pid], [accepted], [samples], [0.0], [0])
            trace.append(accepted / samples)
        traces.append(trace)
    ids = list(range(len(traces)))
    easy, hard = history.zero_variance_streaks(ids)
    ours = skip_probability(easy, hard, p_easy, p_hard)
    theirs = [authors_skip_probability(trace, p_easy, p_hard) for trace in traces]
    assert ours == pytest.approx(theirs, abs=1e-12)
