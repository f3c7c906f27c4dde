"""Learning-curve fits and cost-to-target readings, against hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gvmrl.analysis import (
    SaturatingFit,
    cost_to_target,
    eval_curve,
    fit_saturating,
    paired_difference,
)


def test_fit_recovers_an_exact_saturating_curve():
    x = np.arange(0, 21, 4.0)
    y = 0.6 - 0.1 * np.exp(-x / 5.0)
    fit = fit_saturating(x, y)
    # tau lies on a log grid of ratio 10^(4/199) ~ 1.047, so a and b are recovered closely
    assert fit.tau == pytest.approx(5.0, rel=0.03)
    assert fit.plateau == pytest.approx(0.6, abs=2e-3)
    assert fit.drop == pytest.approx(0.1, abs=2e-3)
    assert np.abs(fit(x) - y).max() < 1e-3


def test_cost_to_reach_hand_derived():
    fit = SaturatingFit(plateau=0.6, drop=0.1, tau=5.0, rmse=0.0)
    # 0.6 - 0.1 exp(-x/5) = 0.55  <=>  x = 5 ln 2
    assert fit.cost_to_reach(0.55) == pytest.approx(5 * math.log(2))
    assert fit.cost_to_reach(0.45) == 0.0  # the start (0.5) is already there
    assert fit.cost_to_reach(0.6) == math.inf  # the plateau itself is never reached
    assert fit.cost_to_reach(0.55, horizon=3.0) == math.inf  # 3.47 lies beyond the data
    assert SaturatingFit(0.5, -0.1, 5.0, 0.0).cost_to_reach(0.55) == 0.0  # falling, starts above


def test_cost_to_target_reads_evaluated_rows_only_and_does_not_extrapolate():
    rows = [{"iteration": i, "samples_generated": 100 * i, "wall_time": i * i} for i in range(13)]
    for row in rows[::4]:  # evaluated every 4 iterations
        row["eval_accuracy"] = 0.6 - 0.1 * math.exp(-row["iteration"] / 5)
    x, _ = eval_curve(rows, "samples_generated")
    assert x.tolist() == [0, 400, 800, 1200]
    assert cost_to_target(rows, 0.55, "iteration") == pytest.approx(5 * math.log(2), rel=0.03)
    assert cost_to_target(rows, 0.55, "samples_generated") == pytest.approx(
        500 * math.log(2), rel=0.03
    )
    # the iteration read off the fit, 5 ln 2 ~ 3.47, converted through the run's own clock:
    # between iteration 3 (9 s) and 4 (16 s)
    crossing = 5 * math.log(2)
    assert cost_to_target(rows, 0.55, "wall_time") == pytest.approx(
        9 + (crossing - 3) * 7, rel=0.03
    )
    # 0.59 would be reached at 5 ln 10 ~ 11.5 iterations: inside the run; 0.595 at 15: beyond it
    assert cost_to_target(rows, 0.59, "iteration") == pytest.approx(5 * math.log(10), rel=0.03)
    assert cost_to_target(rows, 0.595, "iteration") == math.inf


def test_paired_difference_hand_derived():
    # differences 0.1, 0.0, 0.2: mean 0.1, sample std 0.1, standard error 0.1 / sqrt(3)
    mean, sem = paired_difference([0.6, 0.5, 0.7], [0.5, 0.5, 0.5])
    assert mean == pytest.approx(0.1)
    assert sem == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(paired_difference([0.6], [0.5])[1])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.6, 0.5], [0.5])
