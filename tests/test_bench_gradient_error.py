"""bench/gradient_error.py: the M-step error model against direct sums, simulation and
exhaustive search."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gradient_error import (  # noqa: E402  (bench/ is a directory of scripts, not a package)
    accepted_mean_error,
    best_sizes,
    inverse_binomial_moment,
)


def _direct_inverse_moment(n: int, p: float) -> float:
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) / k for k in range(1, n + 1))


@pytest.mark.parametrize(
    "n,p", [(0, 0.5), (1, 0.3), (5, 0.0), (5, 1.0), (8, 0.125), (16, 0.7), (40, 0.05)]
)
def test_inverse_binomial_moment_matches_the_direct_sum(n, p):
    assert inverse_binomial_moment(n, p) == pytest.approx(_direct_inverse_moment(n, p), abs=1e-12)


def test_inverse_binomial_moment_broadcasts_and_rejects_bad_input():
    got = inverse_binomial_moment(np.array([[1], [4]]), np.array([0.5, 1.0]))
    assert got.shape == (2, 2)
    assert got[1, 1] == pytest.approx(0.25)  # p = 1: exactly 4 accepted
    with pytest.raises(ValueError):
        inverse_binomial_moment(3, 1.5)
    with pytest.raises(ValueError):
        inverse_binomial_moment(-1, 0.5)


def test_accepted_mean_error_matches_a_simulation():
    """Draw n responses, average the accepted ones' gradients (0 if none), measure the error."""
    rng = np.random.default_rng(0)
    mu = np.array([1.0, -2.0, 0.5])
    scale = 0.8  # per coordinate: spread s^2 = 3 * 0.64
    for n, p in [(1, 0.6), (4, 0.25), (12, 0.1)]:
        reps = 200_000
        accepted = rng.binomial(n, p, size=reps)
        # the mean of k Gaussian draws is Gaussian with variance scale^2 / k per coordinate
        noise = rng.normal(size=(reps, 3)) * scale / np.sqrt(np.maximum(accepted, 1))[:, None]
        estimate = np.where(accepted[:, None] > 0, mu + noise, 0.0)
        simulated = ((estimate - mu) ** 2).sum(axis=1).mean()
        predicted = accepted_mean_error(n, p, 3 * scale**2, (mu**2).sum())
        assert predicted == pytest.approx(simulated, rel=0.02)


def test_best_sizes_is_the_exhaustive_optimum():
    rng = np.random.default_rng(1)
    p = np.array([0.1, 0.5, 0.9])
    spread, mean_sq = rng.uniform(0.5, 3, size=3), rng.uniform(0.1, 2, size=3)
    budget = 7
    table = accepted_mean_error(
        np.arange(budget + 1)[None, :], p[:, None], spread[:, None], mean_sq[:, None]
    )
    best = min(
        (sizes for sizes in itertools.product(range(budget + 1), repeat=3) if sum(sizes) == budget),
        key=lambda sizes: sum(table[i, n] for i, n in enumerate(sizes)),
    )
    got = best_sizes(table, budget)
    assert got.sum() == budget
    assert table[np.arange(3), got].sum() == pytest.approx(table[np.arange(3), best].sum())
    with pytest.raises(ValueError):
        best_sizes(table, budget + 1)
