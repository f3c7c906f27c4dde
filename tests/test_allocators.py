"""Allocation rules behind one interface: uniform and GVM with a stand-in trainer context."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from gvmrl.allocation import allocate
from gvmrl.allocators import (
    ALLOCATORS,
    AllocationContext,
    GVMAllocator,
    UniformAllocator,
    make_allocator,
)
from gvmrl.config import ConfigError, load_config
from gvmrl.records import PromptRecord, Rollouts
from gvmrl.rollout import Sample

PROMPTS = [PromptRecord(str(i), f"p{i}", "1") for i in range(4)]
# pre-sample verdicts per prompt (N' = 4): prompt 0 always right, 1 half, 2 never, 3 one in four
VERDICTS = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]]


class StandIn:
    """Records what the rule asks of the trainer; norms are 1 + the prompt index."""

    def __init__(self):
        self.requests, self.phases, self.lines = [], [], []

    def sample(self, prompts, sizes, round=0):
        self.requests.append((list(sizes), round))
        samples, scores, group = [], [], []
        for i, n in enumerate(sizes):
            for k in range(n):
                samples.append(Sample(i, [1], [2] * (i + 1), "x", [0.0] * (i + 1), "stop"))
                scores.append(float(VERDICTS[i][k % 4]))
                group.append(i)
        return Rollouts(samples, np.array(scores), np.array(group))

    def grad_norms(self, samples, params, micro_batch_size):
        return np.array([float(len(s.response_ids)) for s in samples])

    @contextlib.contextmanager
    def timer(self, phase):
        self.phases.append(phase)
        yield

    def context(self):
        return AllocationContext(self.sample, self.grad_norms, self.timer, self.lines.append)


def config(*overrides):
    return load_config(None, ["prompts_per_iteration=4", "gvm.presamples=4", *overrides])


def test_uniform_gives_every_prompt_n_and_draws_nothing():
    stand_in = StandIn()
    allocation = UniformAllocator(config("samples_per_prompt=3")).allocate(
        PROMPTS, stand_in.context()
    )
    assert allocation.sizes.tolist() == [3, 3, 3, 3]
    assert allocation.presamples is None and stand_in.requests == []


def test_gvm_presamples_estimates_and_allocates_the_budget():
    stand_in = StandIn()
    rule = make_allocator(config("allocation=gvm"))
    assert isinstance(rule, GVMAllocator)
    allocation = rule.allocate(PROMPTS, stand_in.context())
    assert stand_in.requests == [([4, 4, 4, 4], 0)]
    assert stand_in.phases == ["presample", "stats"]
    p = np.array([1.0, 0.5, 0.0, 0.25])
    g = np.array([1.0, 2.0, 0.0, 4.0])  # every accepted sample of prompt i has norm i + 1
    assert allocation.sizes.tolist() == allocate(p, g, 16, rule="gvm").tolist()
    assert allocation.sizes.sum() == 16 and allocation.sizes[2] == 0
    assert allocation.metrics["accept_rate_mean"] == pytest.approx(p.mean())
    assert allocation.metrics["samples_per_prompt"] == allocation.sizes.tolist()
    assert not allocation.train_on_presamples
    main = stand_in.sample(PROMPTS, allocation.sizes)
    assert allocation.training_rollouts(main) is main


def test_budget_inclusive_allocates_what_the_presamples_left_and_trains_on_them():
    stand_in = StandIn()
    rule = make_allocator(
        config("allocation=gvm", "gvm.budget_inclusive=true", "samples_per_prompt=6")
    )
    allocation = rule.allocate(PROMPTS, stand_in.context())
    assert allocation.sizes.sum() == 6 * 4 - 4 * 4 and allocation.train_on_presamples
    main = stand_in.sample(PROMPTS, allocation.sizes)
    trained = allocation.training_rollouts(main)
    assert len(trained.samples) == 16 + 8 and trained.samples[:16] == allocation.presamples.samples


def test_gvm_reports_an_empty_allocation():
    stand_in = StandIn()
    rule = GVMAllocator(config("allocation=gvm"))
    nothing = np.zeros(4)
    assert rule.sizes(nothing, nothing, 4, stand_in.lines.append).tolist() == [0, 0, 0, 0]
    assert stand_in.lines and "no prompt qualified" in stand_in.lines[0]


def test_rules_have_state_and_config_takes_registered_names(monkeypatch):
    for name, rule in ALLOCATORS.items():
        built = rule(config(f"allocation={name}"))
        built.load_state_dict(built.state_dict())
    with pytest.raises(ConfigError, match="allocation: must be one of"):
        config("allocation=fixed")
    monkeypatch.setitem(ALLOCATORS, "fixed", UniformAllocator)
    assert config("allocation=fixed").allocation == "fixed"
