"""Reinforce-Ada helpers against hand cases and a naive transcription of the authors' loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrl.allocation_rules.reinforce_ada import (
    global_advantages,
    global_baseline,
    round_sizes,
    select_group,
    still_active,
)


def test_exit_rules_hand_cases():
    pos, neg = [0, 1, 2, 2, 3], [5, 1, 1, 2, 0]
    # balanced with K = 4 needs >= 2 positives and >= 2 negatives
    assert still_active(pos, neg, 4).tolist() == [True, True, True, False, True]
    # positive-focused needs one positive
    assert still_active(pos, neg, 4, "positive_focused").tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="exit_rule"):
        still_active(pos, neg, 4, "other")


def test_round_sizes_within_budget():
    active = [True, False, True, True]
    assert round_sizes(active, 8).tolist() == [8, 0, 8, 8]
    assert round_sizes(active, 8, remaining_budget=30).tolist() == [8, 0, 8, 8]
    assert round_sizes(active, 8, remaining_budget=10).tolist() == [4, 0, 3, 3]
    assert round_sizes(active, 8, remaining_budget=0).tolist() == [0, 0, 0, 0]


def test_select_group_hand_cases():
    labels = [False, True, False, False, True, True]  # positives at 1, 4, 5
    # retired, K = 4: first 2 positives (1, 4) and first 2 negatives (0, 2)
    assert select_group(labels, 4, finished=True).tolist() == [0, 1, 2, 4]
    # K = 4, only one negative: 2 positives + 1 negative, topped up with the third positive
    assert select_group([True, True, True, False], 4, finished=True).tolist() == [0, 1, 2, 3]
    assert select_group([True] * 5 + [False], 4, finished=True).tolist() == [0, 1, 2, 5]
    # out of rounds with all negatives: K of them
    assert select_group([False] * 8, 4, finished=False).tolist() == [0, 1, 2, 3]
    # positive-focused fallback: 1 of 8 positive -> ceil(.125 * 4) = 1 positive, 3 negatives
    chosen = select_group([False] * 7 + [True], 4, finished=False, exit_rule="positive_focused")
    assert chosen.tolist() == [0, 1, 2, 7]
    assert select_group([], 4, finished=False).tolist() == []


def test_global_baseline_hand_case():
    # 3 positives of 8: mean .375, unbiased var = 3 * 5 / (8 * 7) = .267857, std .517549
    mean, std = global_baseline([3, 1, 0], [5, 0, 4])
    assert mean[0] == pytest.approx(0.375) and std[0] == pytest.approx(0.517549, abs=1e-6)
    assert (mean[1], std[1]) == (0.0, 1.0)  # a single outcome: no baseline
    assert std[2] == pytest.approx(1e-6)  # all negative: clamped at eps
    assert global_advantages([1, 0], 0.375, 0.5).tolist() == [0.625, -0.375]
    assert global_advantages([1.0], 0.5, 0.5, scale_by_std=True)[0] == pytest.approx(1.0, 1e-5)


@given(st.integers(0, 40), st.integers(0, 40))
def test_global_baseline_matches_numpy(pos, neg):
    mean, std = global_baseline([pos], [neg])
    if pos + neg <= 1:
        assert (mean[0], std[0]) == (0.0, 1.0)
        return
    outcomes = np.array([1.0] * pos + [0.0] * neg)
    assert mean[0] == pytest.approx(outcomes.mean())
    assert std[0] == pytest.approx(max(outcomes.std(ddof=1), 1e-6), rel=1e-9)


# ---- the authors' loop, transcribed naively --------------------------------------------------


def authors_loop(outcomes, group_size, choice, max_rounds, round_repeat):
    """Plain reading of `_generate_multi_round_adaptive_downsampling`: per prompt, caches of
    positive and negative sample numbers, a finished flag, and the down-sampling rules.
    `outcomes[i]` is prompt i's stream of 0/1 results, consumed in generation order."""
    batch = len(outcomes)
    pos = [[] for _ in range(batch)]
    neg = [[] for _ in range(batch)]
    drawn = [0] * batch
    finished = [False] * batch
    selected = {}
    generated = 0

    def downsample(i, target_total):
        target_pos = min(target_total // 2, len(pos[i]))
        target_neg = min(target_total - target_pos, len(neg[i]))
        if target_pos + target_neg < target_total:
            if len(pos[i]) > target_pos:
                target_pos += min(len(pos[i]) - target_pos, target_total - target_pos - target_neg)
            elif len(neg[i]) > target_neg:
                target_neg += min(len(neg[i]) - target_neg, target_total - target_pos - target_neg)
        return sorted(pos[i][:target_pos] + neg[i][:target_neg])

    for _ in range(max_rounds):
        active = [i for i in range(batch) if not finished[i]]
        if not active:
            break
        for i in active:
            for _ in range(round_repeat):
                (pos if outcomes[i][drawn[i]] else neg)[i].append(drawn[i])
                drawn[i] += 1
                generated += 1
            if choice == "balanced":
                done = (
                    len(pos[i]) >= group_size // 2 and len(neg[i]) >= group_size - group_size // 2
                )
            else:
                done = len(pos[i]) >= 1
            if done:
                selected[i] = downsample(i, group_size)
                finished[i] = True
    for i in range(batch):
        if finished[i]:
            continue
        n_rows = len(pos[i]) + len(neg[i])
        take = min(group_size, n_rows)
        if choice == "positive_focused":
            ratio = len(pos[i]) / n_rows if n_rows else 0.0
            target_pos = max(min(math.ceil(ratio * group_size), take - 1), 1)
            target_neg = take - target_pos
        else:
            target_pos, target_neg = group_size // 2, group_size - group_size // 2
        actual_pos, actual_neg = min(len(pos[i]), target_pos), min(len(neg[i]), target_neg)
        if actual_pos + actual_neg < take:
            if len(pos[i]) > actual_pos:
                actual_pos += min(len(pos[i]) - actual_pos, take - actual_pos - actual_neg)
            elif len(neg[i]) > actual_neg:
                actual_neg += min(len(neg[i]) - actual_neg, take - actual_pos - actual_neg)
        selected[i] = sorted(pos[i][:actual_pos] + neg[i][:actual_neg])
    return [selected[i] for i in range(batch)], generated, [len(p) for p in pos]


def helpers_loop(outcomes, group_size, choice, max_rounds, round_repeat):
    """The same iteration driven by the helpers, as the trainer's allocator would."""
    batch = len(outcomes)
    labels = [[] for _ in range(batch)]
    active = np.ones(batch, dtype=bool)
    generated = 0
    for _ in range(max_rounds):
        if not active.any():
            break
        sizes = round_sizes(active, round_repeat)
        for i in np.flatnonzero(sizes):
            labels[i] += outcomes[i][len(labels[i]) : len(labels[i]) + sizes[i]]
        generated += int(sizes.sum())
        pos = np.array([sum(lab) for lab in labels])
        neg = np.array([len(lab) - sum(lab) for lab in labels])
        active &= still_active(pos, neg, group_size, choice)
    finished = ~active
    groups = [
        select_group(labels[i], group_size, bool(finished[i]), choice).tolist()
        for i in range(batch)
    ]
    return groups, generated, [sum(lab) for lab in labels]


@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 10),
    st.integers(1, 8),
    st.sampled_from(["balanced", "positive_focused"]),
    st.integers(1, 5),
    st.integers(1, 8),
)
@settings(max_examples=200, deadline=None)
def test_matches_the_authors_loop(seed, batch, group_size, choice, max_rounds, round_repeat):
    rng = np.random.default_rng(seed)
    success = rng.uniform(0, 1, size=batch) ** 2
    outcomes = [[bool(x) for x in rng.random(max_rounds * round_repeat) < s] for s in success]
    assert helpers_loop(outcomes, group_size, choice, max_rounds, round_repeat) == authors_loop(
        outcomes, group_size, choice, max_rounds, round_repeat
    )


@given(
    st.lists(st.booleans(), max_size=30),
    st.integers(1, 8),
    st.booleans(),
    st.sampled_from(["balanced", "positive_focused"]),
)
def test_selection_is_a_subset_of_the_right_size(labels, group_size, finished, choice):
    chosen = select_group(labels, group_size, finished, choice)
    assert len(chosen) == min(group_size, len(labels))
    assert len(set(chosen.tolist())) == len(chosen)
    assert all(0 <= i < len(labels) for i in chosen)


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(1, 8), st.integers(0, 300))
def test_round_sizes_never_exceed_budget_or_touch_retired(active, repeat, budget):
    sizes = round_sizes(active, repeat, budget)
    assert sizes.sum() <= budget and np.all(sizes[~np.array(active)] == 0)
    assert np.all(sizes <= repeat)
    if sum(active) * repeat <= budget:
        assert sizes.sum() == sum(active) * repeat
    else:
        assert sizes.sum() == budget
