"""Allocation rules behind one interface: uniform and GVM with a stand-in trainer context, and
every registered rule's state surviving a save and load."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

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
# further prompts, for the rules that draw more than the batch (dapo, greso)
POOL = [PromptRecord(str(i), f"p{i}", "1") for i in range(4, 40)]
# verdicts of prompt id k: VERDICTS[k % 4] (N' = 4): 0 always right, 1 half, 2 never, 3 one in four
VERDICTS = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]]


class StandIn:
    """Records what the rule asks of the trainer; the norms of prompt id k are 1 + k % 4."""

    def __init__(self):
        self.requests, self.asked, self.phases, self.lines = [], [], [], []

    def sample(self, prompts, sizes, round=0):
        self.requests.append((list(sizes), round))
        self.asked.append([r.id for r in prompts])
        samples, scores, group = [], [], []
        for i, (record, n) in enumerate(zip(prompts, sizes)):
            kind = int(record.id) % 4
            for k in range(n):
                samples.append(Sample(i, [1], [2] * (kind + 1), "x", [0.0] * (kind + 1), "stop"))
                scores.append(float(VERDICTS[kind][k % 4]))
                group.append(i)
        return Rollouts(samples, np.array(scores, dtype=float), np.array(group, dtype=np.int64))

    def grad_norms(self, samples, params, micro_batch_size):
        return np.array([float(len(s.response_ids)) for s in samples])

    @contextlib.contextmanager
    def timer(self, phase):
        self.phases.append(phase)
        yield

    def more_prompts(self, count, round, exclude):
        return [r for r in POOL if r.id not in exclude][:count]

    def context(self):
        return AllocationContext(
            self.sample,
            self.grad_norms,
            self.timer,
            self.lines.append,
            more_prompts=self.more_prompts,
            train_set_size=len(PROMPTS) + len(POOL),
        )


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
    # p = 1, .5, 0, .25 (accepted of 4); G = 1, 2, -, 4 (every accepted sample of prompt i has
    # norm i + 1). w = G / sqrt(p + 1e-3 / p) = 0.9995, 2.8228, 0, 7.9368 (sum 11.7590); shares
    # of 16 (N' x prompts): 1.360, 3.841, 0, 10.799 -> floors 1, 3, 0, 10 (14); the largest
    # remainders (b .841, d .799) take the last two.
    p = np.array([1.0, 0.5, 0.0, 0.25])
    assert allocation.sizes.tolist() == [1, 4, 0, 11]
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


def iteration(rule, stand_in):
    """One iteration of the trainer's loop: allocate, draw the main samples, observe them;
    returns the allocation and what the M-step trains on."""
    allocation = rule.allocate(PROMPTS, stand_in.context())
    main = stand_in.sample(PROMPTS, allocation.sizes)
    rule.observe(PROMPTS, main, stand_in.context())
    return allocation, allocation.training_rollouts(main)


# GRESO adapts its exploration bases from the first iteration on, so they are state too
RULE_OPTIONS = {"greso": ["greso.adapt_after_prompts=0"]}


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_rule_state_round_trips_through_json(name):
    """After an iteration, a fresh rule loaded with the state (through JSON, as state.json
    holds it) has the same state and allocates the next iteration as the original does."""
    make = ALLOCATORS[name]
    settings = config(f"allocation={name}", *RULE_OPTIONS.get(name, []))
    original = make(settings)
    iteration(original, StandIn())
    state = original.state_dict()
    # a rule either keeps nothing, or what it keeps now differs from a fresh rule's
    assert state == {} or state != make(settings).state_dict()
    restored = make(settings)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state

    runs = []
    for rule in (original, restored):
        stand_in = StandIn()  # the same verdicts and norms for both
        allocation, trained = iteration(rule, stand_in)
        runs.append(
            (stand_in.requests, stand_in.asked, allocation.sizes.tolist(), trained.scores.tolist())
        )
    assert runs[0] == runs[1]
    assert original.state_dict() == restored.state_dict()


def test_config_takes_registered_names(monkeypatch):
    with pytest.raises(ConfigError, match="allocation: must be one of"):
        config("allocation=fixed")
    monkeypatch.setitem(ALLOCATORS, "fixed", UniformAllocator)
    assert config("allocation=fixed").allocation == "fixed"
