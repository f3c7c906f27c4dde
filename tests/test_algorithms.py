"""The algorithm registry: each algorithm's parts against hand-derived values; config names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gvmrl.algorithms import ALGORITHMS, Algorithm, register_algorithm
from gvmrl.config import ConfigError, LossConfig, load_config

SCORES = np.array([1.0, 0.0, 1.0, 1.0])
GROUP = torch.tensor([0, 0, 1, 1])


def test_raft_variants_train_on_accepted_samples_and_grpo_on_all():
    assert ALGORITHMS["raft"].trains_on(SCORES).tolist() == [True, False, True, True]
    assert ALGORITHMS["raft++"].trains_on(SCORES).tolist() == [True, False, True, True]
    assert ALGORITHMS["grpo"].trains_on(SCORES).tolist() == [True] * 4


def test_advantages_by_hand():
    scores = torch.tensor(SCORES)
    raft = ALGORITHMS["raft++"].advantages(scores, GROUP, LossConfig())
    assert raft.tolist() == [1.0, 0.0, 1.0, 1.0]  # max(r, 0)
    # group 0 = {1, 0}: mean 0.5, unbiased std 1/sqrt(2); group 1 all equal: 0
    grpo = ALGORITHMS["grpo"].advantages(scores, GROUP, LossConfig())
    r = 0.5 * math.sqrt(2)
    assert grpo.tolist() == pytest.approx([r, -r, 0.0, 0.0], rel=1e-5)
    no_std = ALGORITHMS["grpo"].advantages(scores, GROUP, LossConfig(grpo_scale_by_std=False))
    assert no_std.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_per_token_losses_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0, -3.0]])  # ratios 1 and e
    mask = torch.ones(1, 2)
    raft = ALGORITHMS["raft"]
    nll, stats = raft.per_token_loss(logp, old, torch.tensor([5.0]), mask, LossConfig())
    assert nll.tolist() == [[1.0, 2.0]] and stats == {}
    clipped, stats = ALGORITHMS["raft++"].per_token_loss(
        logp, old, torch.tensor([1.0]), mask, LossConfig(clip_low=0.2, clip_high=0.2)
    )
    # A = 1: max(-rho, -clip(rho, 0.8, 1.2)) = -1 for rho = 1 and -1.2 (clipped) for rho = e
    assert clipped[0].tolist() == pytest.approx([-1.0, -1.2])
    assert float(stats["clipfrac"]) == pytest.approx(0.5)


def test_config_accepts_exactly_the_registered_names(monkeypatch):
    with pytest.raises(ConfigError, match="algorithm: must be one of"):
        load_config(None, ["algorithm=sft"])
    monkeypatch.setitem(ALGORITHMS, "sft", ALGORITHMS["raft"])
    assert load_config(None, ["algorithm=sft"]).algorithm == "sft"


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Algorithm("grpo", *[ALGORITHMS["grpo"].trains_on] * 3))
