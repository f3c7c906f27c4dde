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
    mean_curve_crossing,
    paired_difference,
    seed_mean_curve,
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


def test_seed_mean_curve_averages_aligned_evaluations():
    seeds = [
        [
            {"iteration": 0, "eval_accuracy": a},
            {"iteration": 1},
            {"iteration": 2, "eval_accuracy": b},
        ]
        for a, b in ((0.4, 0.6), (0.5, 0.5))
    ]
    x, y = seed_mean_curve(seeds)
    assert x.tolist() == [0, 2] and y == pytest.approx([0.45, 0.55])
    with pytest.raises(ValueError, match="different numbers of evaluations"):
        seed_mean_curve([seeds[0], seeds[1][:1]])


def test_mean_curve_crossing_agrees_with_the_measured_end():
    x = np.arange(0, 21, 4.0)
    y = 0.6 - 0.1 * np.exp(-x / 5.0)
    # an exact saturating curve: the crossing is where 0.6 - 0.1 exp(-x/5) = 0.55, x = 5 ln 2
    assert mean_curve_crossing(x, y, 0.55) == pytest.approx(5 * math.log(2), rel=0.03)
    # a last point above the target whose fitted curve ends below it: reached, at the end (the
    # old reading called this "never")
    bumped = y.copy()
    bumped[-1] += 0.02
    target = bumped[-1] - 0.001
    assert fit_saturating(x, bumped)(x[-1]) < target
    assert mean_curve_crossing(x, bumped, target) == 20.0
    # a last point below the target is not reached, even where the fit crosses earlier
    dipped = y.copy()
    dipped[-1] -= 0.02
    assert fit_saturating(x, dipped).cost_to_reach(0.58) < 20
    assert mean_curve_crossing(x, dipped, 0.58) == math.inf
    # a start already at the target: reached before any training
    assert mean_curve_crossing(x, y, 0.45) == 0.0
