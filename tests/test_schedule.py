"""The shared learning-rate schedule: warm-up, then constant or cosine decay to a floor."""

from __future__ import annotations

import math

import pytest
import torch

from gvmrl.schedule import lr_factor, lr_scheduler


def test_warms_up_then_decays_by_cosine_to_the_floor():
    def factor(step, **kw):
        return lr_factor(step, warmup_steps=10, total_steps=100, floor=0.1, **kw)

    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    # halfway through the decay: cos(pi/2) = 0, so halfway between peak and floor
    assert factor(55) == pytest.approx(0.55)
    assert factor(100) == pytest.approx(0.1)
    assert factor(250) == pytest.approx(0.1)  # past the end it stays at the floor
    assert factor(55, schedule="constant") == 1.0
    assert lr_factor(100, warmup_steps=10, total_steps=100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_sets_the_peak_times_the_factor_each_step():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = lr_scheduler(optimizer, warmup_steps=2, total_steps=6, floor=0.5)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 1, 2; then 2 * (0.5 + 0.5 * (1 + cos(pi * k / 4)) / 2) for k = 0..4, then the floor
    cosine = [2.0 * (0.5 + 0.25 * (1 + math.cos(math.pi * k / 4))) for k in range(5)]
    assert seen == pytest.approx([1.0, 2.0, *cosine])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_scheduler(optimizer, warmup_steps=0, total_steps=1, schedule="linear")
