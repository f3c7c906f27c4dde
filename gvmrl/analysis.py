"""Learning-curve analysis shared by `gvmrl demo` and bench/convergence.py.

Held-out accuracy curves are noisy (a few points between evaluations of the same weights), so
"when did a run reach the target" is read off a fitted curve rather than the first noisy crossing:

    acc(x) = a - b * exp(-x / tau)        (b > 0: rising towards the plateau a)

fitted by least squares, with tau on a log grid and a, b solved linearly for each tau. x is the
cost axis: iterations, generated samples (pre-samples included) or wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gvmrl.tracking import read_metrics

COST_AXES = {
    "iteration": "EM iterations",
    "samples_generated": "generated samples (pre-samples included)",
    "wall_time": "wall time (s)",
}


@dataclass(frozen=True)
class SaturatingFit:
    """acc(x) = plateau - drop * exp(-x / tau)."""

    plateau: float
    drop: float
    tau: float
    rmse: float

    def __call__(self, x):
        return self.plateau - self.drop * np.exp(-np.asarray(x, dtype=np.float64) / self.tau)

    def cost_to_reach(self, target: float, horizon: float = math.inf) -> float:
        """Smallest x with acc(x) >= target: 0 if the start is already there, inf if the plateau
        is not, or if x lies beyond `horizon` (pass the last measured x: no extrapolation)."""
        if self(0.0) >= target:
            return 0.0
        if self.drop <= 0 or self.plateau <= target:
            return math.inf
        cost = -self.tau * math.log((self.plateau - target) / self.drop)
        return cost if cost <= horizon else math.inf


def fit_saturating(x, y) -> SaturatingFit:
    """Least-squares fit of acc(x) = a - b exp(-x/tau); a straight line's limit when tau is
    large."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        raise ValueError("need at least two points to fit a learning curve")
    span = max(float(x.max() - x.min()), 1e-9)
    best: SaturatingFit | None = None
    for tau in span * np.logspace(-2, 2, 200):
        basis = np.stack([np.ones_like(x), -np.exp(-x / tau)], axis=1)
        (a, b), *_ = np.linalg.lstsq(basis, y, rcond=None)
        rmse = float(np.sqrt(np.mean((basis @ np.array([a, b]) - y) ** 2)))
        if best is None or rmse < best.rmse:
            best = SaturatingFit(float(a), float(b), float(tau), rmse)
    assert best is not None
    return best


def eval_curve(metrics: list[dict[str, Any]], axis: str) -> tuple[np.ndarray, np.ndarray]:
    """(cost, eval accuracy) at every evaluated iteration of a run's metrics rows."""
    rows = [r for r in metrics if r.get("eval_accuracy") is not None]
    return (
        np.array([float(r[axis]) for r in rows]),
        np.array([float(r["eval_accuracy"]) for r in rows]),
    )


# How far past the last evaluation a fitted curve may be read: the run that defines the target
# reaches it exactly at its end, and rounding must not turn that into "not reached".
EXTRAPOLATION_SLACK = 0.01


def fitted_cost(x, y, target: float) -> float:
    """Cost at which the curve fitted to (x, y) reaches `target`; inf when not within the data."""
    x = np.asarray(x, dtype=np.float64)
    return fit_saturating(x, y).cost_to_reach(
        target, horizon=float(x.max()) * (1 + EXTRAPOLATION_SLACK)
    )


def cost_at_iteration(metrics: list[dict[str, Any]], iteration: float, axis: str) -> float:
    """The run's cumulative cost on `axis` at a (fractional) iteration, linearly interpolated."""
    if not math.isfinite(iteration):
        return math.inf
    xp = [float(r["iteration"]) for r in metrics]
    return float(np.interp(iteration, xp, [float(r[axis]) for r in metrics]))


def cost_to_target(metrics: list[dict[str, Any]], target: float, axis: str) -> float:
    """Cost (on `axis`) at which the run's fitted eval-accuracy curve reaches `target`.

    The curve is fitted once, against iterations, and the iteration where it reaches the target
    is converted to generated samples or wall time through the run's own counters: one reading
    per run, so the axes cannot disagree about whether the target was reached."""
    iteration = fitted_cost(*eval_curve(metrics, "iteration"), target)
    return iteration if axis == "iteration" else cost_at_iteration(metrics, iteration, axis)


def seed_mean_curve(
    seeds: list[list[dict[str, Any]]], axis: str = "iteration"
) -> tuple[np.ndarray, np.ndarray]:
    """(cost, held-out accuracy) averaged over seeds' runs, whose evaluations are aligned (the same
    iterations), both averaged per evaluation."""
    curves = [eval_curve(m, axis) for m in seeds]
    if len({c[0].size for c in curves}) != 1:
        raise ValueError("seeds' runs have different numbers of evaluations")
    return np.mean([c[0] for c in curves], axis=0), np.mean([c[1] for c in curves], axis=0)


def mean_curve_crossing(x, y, target: float) -> float:
    """Where a seed-mean curve (x, y) reaches `target`: inf when its last point is below it, else
    the crossing of its fitted curve, at most its last x.

    Whether the target is reached is read off the measured end, the figure a final-accuracy
    column shows, so the two cannot disagree; the fitted curve only says where. A fit that ends
    just below a measured end at or above the target crosses at the end."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y[-1] < target:
        return math.inf
    return min(fit_saturating(x, y).cost_to_reach(target), float(x[-1]))


def paired_difference(values, baseline) -> tuple[float, float]:
    """Mean and standard error over seeds of `values - baseline`, paired by seed.

    Arms run with the same seed share the start checkpoint, the prompt stream and the evaluation
    prompts, so differencing per seed removes what the two runs share; the standard error is
    that of the mean difference (nan with fewer than two seeds)."""
    values = np.asarray(values, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or values.shape != baseline.shape:
        raise ValueError(
            f"need one value per seed for both arms, got shapes {values.shape} and {baseline.shape}"
        )
    diff = values - baseline
    sem = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
    return float(diff.mean()), sem


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def plot_curves(
    runs: dict[str, list[list[dict[str, Any]]]],
    path: str | Path,
    *,
    target: float | None = None,
    title: str = "",
    axes: tuple[str, ...] = tuple(COST_AXES),
) -> None:
    """One panel per cost axis in `axes` (keys of COST_AXES); each method a line (mean over its
    seeds) with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gvmrl.io import atomic_open

    fig, panels = plt.subplots(1, len(axes), figsize=(5 * len(axes), 4), squeeze=False)
    for ax, axis in zip(panels[0], axes):
        for method, seeds in runs.items():
            curves = [eval_curve(m, axis) for m in seeds if m]
            curves = [c for c in curves if c[0].size]
            if not curves:
                continue
            length = min(c[0].size for c in curves)
            xs = np.mean([c[0][:length] for c in curves], axis=0)
            ys = np.array([c[1][:length] for c in curves])
            line = ax.plot(xs, ys.mean(axis=0), marker="o", markersize=3, label=method)[0]
            if len(curves) > 1:
                ax.fill_between(
                    xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2
                )
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(COST_AXES[axis])
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
