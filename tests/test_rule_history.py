"""PromptHistory against hand cases and a naive per-visit loop; exact checkpoint round trip."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrl.allocation_rules.history import PromptHistory


def test_hand_computed_exponential_average_and_beta_smoothing():
    history = PromptHistory(decay=0.5, accept_prior=(1.0, 1.0))
    # visit 1: 2 of 4 accepted, norms 1 + 2 measured on both; visit 2: 4 of 4, norms sum 8 on 4.
    history.update([7], accepted=[2], samples=[4], grad_norm_sum=[3.0], grad_norm_count=[2])
    history.update([7], accepted=[4], samples=[4], grad_norm_sum=[8.0], grad_norm_count=[4])
    p, g, seen = history.estimates([7])
    # A = .5 * 2 + 4 = 5, S = .5 * 4 + 4 = 6 -> p = (5 + 1) / (6 + 2) = .75
    # N = .5 * 3 + 8 = 9.5, C = .5 * 2 + 4 = 5 -> G = 1.9
    assert p.tolist() == [0.75] and g.tolist() == [pytest.approx(1.9)] and seen.tolist() == [True]
    assert history.samples_seen([7]).tolist() == [8]


def test_decay_zero_keeps_only_the_last_visit_and_one_pools_all():
    last, pooled = PromptHistory(decay=0.0), PromptHistory(decay=1.0)
    for history in (last, pooled):
        history.update([1], [1], [4], [0.0], [0])
        history.update([1], [3], [4], [0.0], [0])
    assert last.estimates([1])[0].tolist() == [0.75]  # 3 / 4
    assert pooled.estimates([1])[0].tolist() == [0.5]  # (1 + 3) / (4 + 4)


def test_unseen_prompts_get_the_prior_and_the_batch_median_norm():
    history = PromptHistory(unseen_accept_rate=0.3)
    history.update([0, 1, 2], [1, 2, 0], [4, 4, 4], [2.0, 8.0, 0.0], [1, 2, 0])
    p, g, seen = history.estimates([0, 1, 2, 99])
    assert seen.tolist() == [True, True, True, False]
    assert p.tolist() == [0.25, 0.5, 0.0, 0.3]
    # known G: 2 and 4; prompt 2 (no accepted sample) and the unseen 99 get the median 3.
    assert g.tolist() == [2.0, 4.0, 3.0, 3.0]
    assert PromptHistory().estimates([5])[1].tolist() == [1.0]  # nothing known at all


def test_zero_variance_streaks_count_latest_consecutive_visits():
    history = PromptHistory()
    for accepted in ([4, 0, 2], [4, 0, 4], [4, 1, 4]):
        history.update([10, 11, 12], accepted, [4, 4, 4], [0.0] * 3, [0] * 3)
    easy, hard = history.zero_variance_streaks([10, 11, 12, 13])
    assert easy.tolist() == [3, 0, 2, 0]
    assert hard.tolist() == [0, 0, 0, 0]  # prompt 11's all-rejected streak of 2 was broken
    history.update([11], [0], [2], [0.0], [0])
    assert history.zero_variance_streaks([11])[1].tolist() == [1]


def test_string_ids_and_numpy_ints_name_prompts():
    history = PromptHistory()
    history.update(["gsm8k-12", 3], [1, 2], [2, 2], [0.0, 0.0], [0, 0])
    assert history.estimates(["gsm8k-12", np.int64(3), "3"])[2].tolist() == [True, True, False]
    assert json.loads(json.dumps(history.state_dict()))["prompt_ids"] == ["gsm8k-12", 3]


def test_zero_samples_is_not_a_visit():
    history = PromptHistory()
    history.update([3, 4], [0, 1], [0, 2], [0.0, 0.0], [0, 0])
    assert history.estimates([3, 4])[2].tolist() == [False, True]
    assert len(history) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_ids=[1, 1], accepted=[0, 0], samples=[1, 1]), "repeat"),
        (dict(prompt_ids=[1], accepted=[3], samples=[2]), r"accepted\[0\]"),
        (dict(prompt_ids=[1], accepted=[1.5], samples=[2]), r"accepted\[0\]"),
        (dict(prompt_ids=[1], accepted=[-1], samples=[2]), r"accepted\[0\]"),
        (dict(prompt_ids=[1], accepted=[1], samples=[2], grad_norm_count=[2]), "grad_norm_count"),
        (dict(prompt_ids=[1], accepted=[1], samples=[2], grad_norm_sum=[np.nan]), "grad_norm_sum"),
        (dict(prompt_ids=[0.5], accepted=[1], samples=[2]), "prompt_ids"),
        (dict(prompt_ids=[None], accepted=[1], samples=[2]), "prompt_ids"),
    ],
)
def test_invalid_update_names_field(kwargs, match):
    kwargs.setdefault("grad_norm_sum", [0.0] * len(kwargs["prompt_ids"]))
    kwargs.setdefault("grad_norm_count", [0] * len(kwargs["prompt_ids"]))
    with pytest.raises(ValueError, match=match):
        PromptHistory().update(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decay=1.5), "decay"),
        (dict(accept_prior=(-1, 0)), "accept_prior"),
        (dict(unseen_accept_rate=2.0), "unseen_accept_rate"),
    ],
)
def test_invalid_options_name_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptHistory(**kwargs)


def naive_estimates(visits, prompt_id, decay, a, b, unseen_p):
    """Per-visit loop: each visit multiplies the past by `decay` and adds its own counts."""
    acc = n = g_sum = g_cnt = 0.0
    seen = False
    for pid, accepted, samples, s, c in visits:
        if pid != prompt_id or samples == 0:
            continue
        seen = True
        acc, n = decay * acc + accepted, decay * n + samples
        g_sum, g_cnt = decay * g_sum + s, decay * g_cnt + c
    p = (acc + a) / (n + a + b) if seen else unseen_p
    return p, (g_sum / g_cnt if g_cnt > 0 else None), seen


visit_strategy = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(0, 8),
        st.integers(0, 8),
        st.floats(0.0, 10.0),
        st.integers(0, 8),
    ).map(lambda t: (t[0], min(t[1], t[2]), t[2], t[3], min(t[4], min(t[1], t[2])))),
    max_size=30,
)


@given(visit_strategy, st.floats(0.0, 1.0), st.floats(0.0, 2.0), st.floats(0.0, 2.0))
@settings(max_examples=150, deadline=None)
def test_matches_naive_loop_and_round_trips_exactly(visits, decay, a, b):
    history = PromptHistory(decay=decay, accept_prior=(a, b), unseen_accept_rate=0.4)
    for visit in visits:
        pid, accepted, samples, s, c = visit
        history.update([pid], [accepted], [samples], [s], [c])
    ids = list(range(7))
    p, g, seen = history.estimates(ids)
    known_g = []
    for k, pid in enumerate(ids):
        ref_p, ref_g, ref_seen = naive_estimates(visits, pid, decay, a, b, 0.4)
        assert seen[k] == ref_seen
        assert p[k] == pytest.approx(ref_p, rel=1e-12, abs=1e-12)
        if ref_g is not None:
            assert g[k] == pytest.approx(ref_g, rel=1e-9)
            known_g.append(ref_g)
    fill = np.median(known_g) if known_g else 1.0
    for k, pid in enumerate(ids):
        if naive_estimates(visits, pid, decay, a, b, 0.4)[1] is None:
            assert g[k] == pytest.approx(fill, rel=1e-9)

    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    from_torch = PromptHistory(decay=decay, accept_prior=(a, b), unseen_accept_rate=0.4)
    from_torch.load_state_dict(torch.load(buffer, weights_only=True))
    from_json = PromptHistory(decay=decay, accept_prior=(a, b), unseen_accept_rate=0.4)
    from_json.load_state_dict(json.loads(json.dumps(history.state_dict())))
    for restored in (from_torch, from_json):
        for before, after in zip(history.estimates(ids), restored.estimates(ids)):
            assert np.array_equal(before, after)
    # and the copies stay identical, bit for bit, as training continues
    for store in (history, from_torch, from_json):
        store.update([0, 6], [1, 2], [3, 2], [0.5, 1.25], [1, 2])
    assert history.state_dict() == from_torch.state_dict() == from_json.state_dict()


def test_load_rejects_a_malformed_state():
    state = PromptHistory().state_dict()
    del state["visits"]
    with pytest.raises(ValueError, match="expected keys"):
        PromptHistory().load_state_dict(state)
