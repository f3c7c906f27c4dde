"""DAPO dynamic sampling helpers against hand cases and a naive transcription of verl's loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrl.allocation_rules.dapo import (
    informative_groups,
    prompts_for_next_round,
    should_stop,
    trim_to_target,
)


def test_informative_groups_hand_case():
    rewards = [1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 1]
    # groups: [1 1] equal, [1 0 1] mixed, [] empty, [0 0] equal, [.5 .5] equal, [1] single
    group = [0, 0, 1, 1, 1, 3, 3, 4, 4, 5]
    keep = informative_groups(rewards, group, 6)
    assert keep.tolist() == [False, True, False, False, False, True]


def test_next_round_size():
    # verl: always the fixed generation batch
    assert prompts_for_next_round(10, 0.4, 8, gen_batch_size=64) == 64
    # GRESO: 10 groups * 8 samples / .4 / 8 * 1.25 = 31.25 -> 31, within [16, 64]
    assert (
        prompts_for_next_round(10, 0.4, 8, gen_batch_size=64, adaptive=True, min_prompts=16) == 31
    )
    assert prompts_for_next_round(2, 0.5, 8, gen_batch_size=64, adaptive=True, min_prompts=16) == 16
    assert prompts_for_next_round(60, 0.5, 8, gen_batch_size=64, adaptive=True) == 64
    assert prompts_for_next_round(5, 0.0, 8, gen_batch_size=64, adaptive=True) == 64  # no info
    with pytest.raises(ValueError, match="groups_missing"):
        prompts_for_next_round(0, 0.5, 8, gen_batch_size=64)


def test_stop_and_trim():
    assert should_stop(32, 32, 1, 10) and should_stop(5, 32, 10, 10)
    assert not should_stop(31, 32, 9, 10)
    assert trim_to_target([False, True, True, False, True], 2).tolist() == [1, 2]
    assert trim_to_target([False, True], 4).tolist() == [1]


def test_bad_shapes_fail():
    with pytest.raises(ValueError, match="one length"):
        informative_groups([1, 0], [0], 1)
    with pytest.raises(ValueError, match="group"):
        informative_groups([1, 0], [0, 2], 2)


@given(
    st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), max_size=6), min_size=1, max_size=20),
    st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_informative_matches_numpy_std(groups, rnd):
    flat = [(r, k) for k, group in enumerate(groups) for r in group]
    rnd.shuffle(flat)  # samples of a group need not be contiguous
    keep = informative_groups([r for r, _ in flat], [k for _, k in flat], len(groups))
    expected = [len(group) == 1 or (len(group) > 1 and np.std(group) > 0) for group in groups]
    assert keep.tolist() == expected


def verl_loop(stream, target, n, gen_batch_size, max_num_gen_batches):
    """verl's DAPO loop, transcribed naively: draw `gen_batch_size` groups per round, keep those
    with np.std > 0 (or one sample), stop at `target` kept groups (then cut the trajectories to
    target * n) or raise at the cap. Returns (kept group ids, groups drawn)."""
    batch, num_prompt_in_batch, num_gen_batches, position = [], 0, 0, 0
    while True:
        new = stream[position : position + gen_batch_size]
        position += gen_batch_size
        num_gen_batches += 1
        kept = [gid for gid, rewards in new if np.std(rewards) > 0 or len(rewards) == 1]
        num_prompt_in_batch += len(kept)
        batch += [(gid, k) for gid in kept for k in range(n)]  # trajectories
        if num_prompt_in_batch < target:
            if max_num_gen_batches <= 0 or num_gen_batches < max_num_gen_batches:
                continue
            raise ValueError("Generated too many")
        batch = batch[: target * n]
        return sorted({gid for gid, _ in batch}), position


def helpers_loop(stream, target, n, gen_batch_size, max_rounds):
    """The same iteration driven by the helpers, as the trainer's allocator would."""
    informative, position, rounds = [], 0, 0
    while not should_stop(int(np.sum(informative)), target, rounds, max_rounds):
        draw = prompts_for_next_round(
            target - int(np.sum(informative)), None, n, gen_batch_size=gen_batch_size
        )
        new = stream[position : position + draw]
        position += draw
        rounds += 1
        informative += informative_groups(
            [r for _, rewards in new for r in rewards], np.repeat(np.arange(len(new)), n), len(new)
        ).tolist()
    kept = trim_to_target(informative, target)
    return [stream[i][0] for i in kept], position


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 8), st.integers(1, 6))
@settings(max_examples=150, deadline=None)
def test_matches_verl_loop(seed, target, gen_batch_size, max_rounds):
    rng = np.random.default_rng(seed)
    n = 4
    success = rng.uniform(0, 1, size=200) ** 3  # many hard prompts: all-zero groups are common
    stream = [(gid, (rng.random(n) < success[gid]).astype(float).tolist()) for gid in range(200)]
    ours, drawn = helpers_loop(stream, target, n, gen_batch_size, max_rounds)
    try:
        theirs, their_drawn = verl_loop(stream, target, n, gen_batch_size, max_rounds)
    except ValueError:  # verl gives up at the cap; we train on what we have and report it
        assert len(ours) < target and drawn == max_rounds * gen_batch_size
        return
    assert ours == theirs and drawn == their_drawn
