"""Per-prompt sample allocation: how many of the iteration's N samples each prompt gets.

GVM (arXiv 2505.02391, Sec. 3 and Alg. 1) minimises the variance of the stochastic gradient of
the EM objective under a fixed sampling budget. For prompt i with accept rate p_i and expected
gradient norm G_i of an accepted sample, the variance-optimal share is proportional to

    w_i = G_i / sqrt(p_i + alpha / p_i^(beta - 1))

where the alpha term (the paper's practical regulariser, defaults alpha=1e-3, beta=2) keeps the
share of very hard prompts (p_i -> 0) from exploding. A prompt with p_i = 0 or G_i = 0 yields no
accepted gradient, so it gets w_i = 0.

Everything here is a pure function of numpy arrays: the training loop, the `gvmrl allocate`
command and user code share it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

WeightRule = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]

MAX_BUDGET = 2**53
"""Largest budget `allocate` accepts: shares are float64, which holds every integer only up to
2^53; above it the rounded sizes could no longer be made to sum to the budget exactly."""


def gvm_weights(
    accept_rates: np.ndarray, grad_norms: np.ndarray, alpha: float, beta: float
) -> np.ndarray:
    """w_i = G_i / sqrt(p_i + alpha / p_i^(beta-1)); 0 where p_i = 0 or G_i = 0.

    alpha = 0 gives the unregularised optimum G_i / sqrt(p_i).
    """
    weights = np.zeros(accept_rates.shape, dtype=np.float64)
    live = (accept_rates > 0) & (grad_norms > 0)
    p = accept_rates[live]
    weights[live] = grad_norms[live] / np.sqrt(p + alpha / p ** (beta - 1.0))
    return weights


def uniform_weights(
    accept_rates: np.ndarray, grad_norms: np.ndarray, alpha: float, beta: float
) -> np.ndarray:
    """Every prompt the same share: the baseline every framework uses."""
    return np.ones(accept_rates.shape, dtype=np.float64)


WEIGHT_RULES: dict[str, WeightRule] = {"gvm": gvm_weights, "uniform": uniform_weights}


def allocate(
    accept_rates,
    grad_norms,
    budget: int,
    *,
    rule: str = "gvm",
    alpha: float = 1e-3,
    beta: float = 2.0,
    min_size: int = 0,
    max_size: int | None = None,
    drop_above: float | None = None,
    min_expected_accepts: float | None = None,
    uniform_share: float = 0.0,
) -> np.ndarray:
    """Split an integer sampling budget over prompts in proportion to the rule's weights.

    Args:
        accept_rates: (B,) estimated accept rate p_i of each prompt, in [0, 1].
        grad_norms: (B,) estimated gradient norm G_i of an accepted sample, finite and >= 0.
        budget: N, the total number of samples to draw this iteration.
        rule: "gvm" (the weights above) or "uniform" (equal weights).
        alpha, beta: the GVM regulariser; ignored by "uniform".
        min_size: floor for every prompt that gets samples at all (a prompt with zero weight
            still gets 0); GRPO needs >= 2 samples in a group for a non-zero advantage.
        max_size: cap per prompt; what a capped prompt cannot take is redistributed to the others
            in proportion to their weights (water-filling).
        drop_above: prompts with p_i > drop_above get 0 (too easy to teach anything).
        min_expected_accepts: prompts whose expected accepted count p_i * n_i under the plain
            proportional allocation is below this get 0; the others share the budget.
        uniform_share: lambda in [0, 1): weights become (1 - lambda) w_i / sum(w) + lambda / B'
            over the B' prompts no filter removed, so every such prompt keeps about lambda x
            budget / B' samples even where noisy pre-samples estimated p_i = 0 or G_i = 0 (a
            defensive mixture with uniform allocation; bench/variance.py measures why it helps).

    Returns:
        (B,) int64 sizes n_i. They sum to `budget` exactly. Without caps or filters each n_i is
        within 1 of its real share budget * w_i / sum(w) (largest-remainder rounding, ties going
        to the lower index, so the result is deterministic). If every weight is 0, all sizes are 0
        and a warning is issued; if the caps of the prompts with positive weight cannot hold the
        budget, they are filled to the cap and the remainder is left unallocated, with a warning.

    Raises:
        ValueError naming the argument and the first bad index for invalid input.
    """
    p, g = _validate(
        accept_rates, grad_norms, budget, min_size, max_size, drop_above, min_expected_accepts
    )
    if rule not in WEIGHT_RULES:
        raise ValueError(f"rule: unknown rule {rule!r}; choose one of {sorted(WEIGHT_RULES)}")
    if alpha < 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha: must be finite and >= 0, got {alpha}")
    if not np.isfinite(beta):
        raise ValueError(f"beta: must be finite, got {beta}")
    if not 0 <= uniform_share < 1:
        raise ValueError(f"uniform_share: must be in [0, 1), got {uniform_share}")

    weights = WEIGHT_RULES[rule](p, g, alpha, beta)
    eligible = np.ones(p.shape, dtype=bool)
    if drop_above is not None:
        eligible &= p <= drop_above
    if min_expected_accepts is not None and weights[eligible].sum() > 0:
        # One pass suffices: dropping prompts only raises the others' shares.
        expected_accepts = p * budget * weights / weights[eligible].sum()
        eligible &= expected_accepts >= min_expected_accepts
    weights[~eligible] = 0.0
    if uniform_share > 0 and eligible.any():
        total = weights.sum()
        rule_share = weights / total if total > 0 else np.zeros_like(weights)
        weights = (1.0 - uniform_share) * rule_share + uniform_share * eligible / eligible.sum()

    sizes = np.zeros(p.shape, dtype=np.int64)
    live = weights > 0
    if budget == 0:
        return sizes
    if not live.any():
        warnings.warn("allocate: every prompt has zero weight; allocating no samples", stacklevel=2)
        return sizes
    w = weights[live] / weights[live].max()  # scale-free; keeps the kinks c = size / w finite
    upper = np.inf if max_size is None else float(max_size)
    if w.size * upper < budget:
        warnings.warn(
            f"allocate: the {w.size} prompts with positive weight can hold only "
            f"{w.size * max_size} of {budget} samples at max_size={max_size}; "
            "the rest is left unallocated",
            stacklevel=2,
        )
        sizes[live] = max_size
        return sizes
    shares = _water_fill(w, budget, float(min_size), upper)
    sizes[live] = _round_preserving_sum(shares, budget, lower=min_size, upper=upper)
    return sizes


def _validate(
    accept_rates, grad_norms, budget, min_size, max_size, drop_above, min_expected_accepts
):
    p = np.asarray(accept_rates, dtype=np.float64)
    g = np.asarray(grad_norms, dtype=np.float64)
    if p.ndim != 1 or g.ndim != 1:
        raise ValueError(
            f"accept_rates and grad_norms must be 1-D, got shapes {p.shape} and {g.shape}"
        )
    if p.shape != g.shape:
        raise ValueError(f"length mismatch: {p.size} accept_rates but {g.size} grad_norms")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if bad.size:
        raise ValueError(f"accept_rates[{bad[0]}] = {p[bad[0]]}: must be in [0, 1]")
    bad = np.flatnonzero(~(np.isfinite(g) & (g >= 0)))
    if bad.size:
        raise ValueError(f"grad_norms[{bad[0]}] = {g[bad[0]]}: must be finite and >= 0")
    if int(budget) != budget or budget < 0:
        raise ValueError(f"budget: must be an integer >= 0, got {budget}")
    if budget > MAX_BUDGET:
        raise ValueError(
            f"budget: {budget} is above 2^53 = {MAX_BUDGET}, beyond which float64 shares cannot "
            "be rounded to sizes that sum to it exactly"
        )
    if int(min_size) != min_size or min_size < 0:
        raise ValueError(f"min_size: must be an integer >= 0, got {min_size}")
    if max_size is not None and (int(max_size) != max_size or max_size < max(min_size, 1)):
        raise ValueError(f"max_size: must be an integer >= max(min_size, 1), got {max_size}")
    if max_size is not None and max_size * p.size < budget:
        raise ValueError(
            f"max_size: {p.size} prompts x max_size={max_size} cannot hold budget={budget}"
        )
    if min_size * p.size > budget:
        raise ValueError(
            f"min_size: {p.size} prompts x min_size={min_size} exceeds budget={budget}"
        )
    if drop_above is not None and not 0 <= drop_above <= 1:
        raise ValueError(f"drop_above: must be in [0, 1], got {drop_above}")
    if min_expected_accepts is not None and not min_expected_accepts >= 0:
        raise ValueError(f"min_expected_accepts: must be >= 0, got {min_expected_accepts}")
    return p, g


def _water_fill(weights: np.ndarray, total: float, lower: float, upper: float) -> np.ndarray:
    """Real shares x_i = clip(c * w_i, lower, upper) with sum(x) = total, for w_i > 0.

    f(c) = sum_i clip(c w_i, lower, upper) is continuous, piecewise linear and non-decreasing in c,
    with kinks at c = lower / w_i (prompt i leaves its floor) and c = upper / w_i (it reaches its
    cap). With the kinks sorted and a prefix sum of the weights in that order, f(c) costs two
    binary searches; we bisect for the crossing and solve the linear piece there exactly.
    Requires len(w) * lower <= total <= len(w) * upper.
    """
    if lower == 0 and upper == np.inf:
        return total * weights / weights.sum()
    # Both kinds of kink are ordered by decreasing weight, so one sort serves both.
    order = np.argsort(-weights, kind="stable")
    w_sorted = weights[order]
    starts, ends = lower / w_sorted, upper / w_sorted
    w_prefix = np.concatenate([[0.0], np.cumsum(w_sorted)])

    def piece(c: float) -> tuple[float, float]:
        """f(c) = const + slope * c on the linear piece containing c."""
        n_started = int(np.searchsorted(starts, c, side="right"))
        n_capped = int(np.searchsorted(ends, c, side="left"))
        const = (weights.size - n_started) * lower + (n_capped * upper if n_capped else 0.0)
        return const, float(w_prefix[n_started] - w_prefix[n_capped])

    lo_c = 0.0
    hi_c = ends[-1] if upper != np.inf else max(starts[-1], total / weights.sum())
    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        if mid in (lo_c, hi_c):
            break
        const, slope = piece(mid)
        if const + slope * mid < total:
            lo_c = mid
        else:
            hi_c = mid
    const, slope = piece(hi_c)
    c = (total - const) / slope if slope > 0 else hi_c
    return np.clip(c * weights, lower, upper)


def _round_preserving_sum(
    shares: np.ndarray, total: int, *, lower: float = 0, upper: float = np.inf
) -> np.ndarray:
    """Largest-remainder rounding: floor every share, then give +1 to the largest remainders.

    Ties go to the lower index (stable sort). Each result is within 1 of its share, and integer
    floors/caps on the shares are kept, since a capped share is already an integer. The count
    still missing is kept in exact integers: at budgets near 2^53 the float shares no longer sum
    to `total` exactly, and `_settle` moves the last units within [lower, upper].
    """
    floors = np.floor(shares).astype(np.int64)
    remainders = shares - floors
    missing = total - int(floors.sum())  # exact (Python ints); 0 <= missing < len when exact
    if not 0 < missing <= floors.size:
        return _settle(floors, remainders, missing, lower, upper)
    # The `missing` largest remainders, in O(B): everything above the cut-off value, then the
    # lowest indices among those equal to it.
    cutoff = np.partition(remainders, remainders.size - missing)[remainders.size - missing]
    above = remainders > cutoff
    tied = np.flatnonzero(remainders == cutoff)[: missing - int(above.sum())]
    floors[above] += 1
    floors[tied] += 1
    if upper != np.inf and (floors > upper).any():  # float error pushed a capped share over
        over = int((floors - upper).clip(min=0).sum())
        floors = np.minimum(floors, int(upper))
        return _settle(floors, remainders, over, lower, upper)
    return floors


def _settle(
    sizes: np.ndarray, remainders: np.ndarray, missing: int, lower: float, upper: float
) -> np.ndarray:
    """Add (missing > 0) or take (< 0) one unit per size, largest (smallest) remainder first,
    among the sizes still inside [lower, upper], until the sizes sum to the budget."""
    while missing:
        step = 1 if missing > 0 else -1
        movable = np.flatnonzero(sizes < upper if step > 0 else sizes > lower)
        if not movable.size:
            break  # the bounds cannot hold the budget (allocate checks this beforehand)
        order = movable[np.argsort(-step * remainders[movable], kind="stable")]
        chosen = order[: min(abs(missing), order.size)]
        sizes[chosen] += step
        remainders[chosen] -= step
        missing -= step * chosen.size
    return sizes
