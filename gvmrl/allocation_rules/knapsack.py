"""Knapsack-RL: the sampling budget as a knapsack over prompts (arXiv 2509.25849).

Facts from the authors' `sampling_budget_by_knapsack` (liziniu/KnapsackRL,
verl/trainer/ppo/exploration_utils.py), restated:

- A prompt with success rate p given n samples is worth

      v(p, n) = (1 - p^n - (1-p)^n) * p (1-p)^2,

  the probability that its group holds both a success and a failure (so GRPO's advantage is not
  zero) times p (1-p)^2, the paper's proxy for the size of the gradient it then contributes.
- p comes from the prompt's earlier visits; a prompt with fewer than 8 recorded samples is
  unknown and gets the default n (`default_size`).
- Known prompts start from a floor: `zero_size` if p = 0, `one_size` if p = 1 (both default to
  `min_size`), `min_size` if 0 < p < 1. Only the last kind ("effective") takes part in the
  knapsack.
- Each effective prompt has a cost, the samples it needs so that a group shows both outcomes
  with probability `confidence`: log(1 - confidence) / log(max(p, 1-p)) ("probability"), or
  1 / (p (1-p)) - 1 ("expectation"). If the remaining budget R (after the floors) exceeds
  sum_i floor(min(max_size, cost_i)), the excess is spread evenly (lower index first) over the
  prompts with p = 0 or unknown p, or, if there are none, over the prompts with p = 1; the
  knapsack then gets exactly that sum.
- The knapsack gives effective prompt i k_i extra samples, 0 <= k_i <= max_size - min_size,
  sum_i k_i <= R, maximising sum_i f_i(k_i) with f_i(0) = 0 and f_i(k) = v(p_i, min_size + k):
  their DP counts a prompt given no extra sample as worth 0, not v(p_i, min_size).
- With no effective prompt, R is spread evenly over the prompts with p = 0 or unknown p, or, if
  there are none, over all prompts (theirs resets everyone to n, the same at budget = B n).

Solver. For min_size >= 1 each f_i is concave: f_i(1) - f_i(0) = v(p, m + 1) = c sum_{j=1..m}
(p^j q + q^j p) >= c (p^m q + q^m p) > c (p^(m+1) q + q^(m+1) p) = f_i(2) - f_i(1) (c = p q^2,
q = 1 - p), and later increments v(n+1) - v(n) = c (p^n q + q^n p) decrease in n. A separable
concave knapsack is solved exactly by taking the R largest marginal values (we take the
min(R, capacity) largest; ties go to the lower prompt index), so no DP table is needed. The
tests check it against a naive DP transcription of the authors' rule.

Deviations, where the authors' code crashes or breaks its own caps: a budget below the floors
raises ValueError (theirs fails an assertion); an excess with no prompt outside the knapsack
stays in the knapsack (theirs divides by zero); budget the knapsack cannot hold at max_size goes
to the prompts outside it (theirs spreads it over the knapsack, past max_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COST_ESTIMATES = ("probability", "expectation")


def knapsack_value(success_rates, sizes) -> np.ndarray:
    """v(p, n) = (1 - p^n - (1-p)^n) p (1-p)^2, elementwise (broadcasting); 0 at p in {0, 1}."""
    p = np.asarray(success_rates, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    q = 1.0 - p
    return (1.0 - p**n - q**n) * p * q * q


def knapsack_cost(success_rates, confidence: float = 0.9, estimate: str = "probability"):
    """Samples a prompt with 0 < p < 1 needs to show both outcomes (see the module docstring).

    Args:
        success_rates: (B,) p_i, each strictly between 0 and 1.
        confidence: alpha in (0, 1) of the "probability" estimate.
        estimate: "probability" (log(1-alpha) / log(max(p, 1-p))) or "expectation"
            (1 / (p (1-p)) - 1).
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if estimate == "probability":
        return np.log1p(-confidence) / np.log(np.maximum(p, 1.0 - p))
    if estimate == "expectation":
        return 1.0 / (p * (1.0 - p)) - 1.0
    raise ValueError(f"cost_estimate: unknown {estimate!r}; choose one of {COST_ESTIMATES}")


@dataclass(frozen=True)
class KnapsackAllocation:
    """What `knapsack_sizes` decided.

    sizes: (B,) int64 samples per prompt, summing to the budget.
    effective: (B,) bool, the prompts with a known 0 < p < 1 that took part in the knapsack.
    excess_redistributed: the estimated costs were below the remaining budget, and the excess
        went to the prompts outside the knapsack (the authors' "fallback").
    effective_ratio: sum of the capped costs / remaining budget when that happened, else 1.
    """

    sizes: np.ndarray
    effective: np.ndarray
    excess_redistributed: bool
    effective_ratio: float


def knapsack_sizes(
    success_rates,
    known,
    budget: int,
    *,
    default_size: int,
    min_size: int = 2,
    max_size: int = 128,
    zero_size: int | None = None,
    one_size: int | None = None,
    confidence: float = 0.9,
    cost_estimate: str = "probability",
    redistribute_excess: bool = True,
) -> KnapsackAllocation:
    """Per-prompt sample counts by Knapsack-RL (rule and solver in the module docstring).

    Args:
        success_rates: (B,) estimated p_i in [0, 1] (ignored where not `known`).
        known: (B,) bool, True where p_i rests on enough history (the authors: >= 8 samples).
        budget: total samples this iteration (the authors: B * default_size).
        default_size: samples of a prompt with unknown p (the authors' n).
        min_size: floor of an effective prompt, >= 1 (the authors' default 2).
        max_size: cap of an effective prompt, >= min_size (the authors run 128).
        zero_size, one_size: floors of known prompts with p = 0 / p = 1 (default min_size).
        confidence, cost_estimate: the cost estimate (`knapsack_cost`).
        redistribute_excess: move budget the costs do not need to the prompts outside the
            knapsack (the authors' `allow_fallback`, on by default).

    Raises:
        ValueError naming the argument for invalid input, or when the floors exceed the budget.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    zero_size = min_size if zero_size is None else zero_size
    one_size = min_size if one_size is None else one_size
    _validate(p, known, budget, default_size, min_size, max_size, zero_size, one_size, confidence)
    if cost_estimate not in COST_ESTIMATES:
        raise ValueError(
            f"cost_estimate: unknown {cost_estimate!r}; choose one of {COST_ESTIMATES}"
        )

    effective = known & (p > 0) & (p < 1)
    zero_or_unknown = ~known | (p == 0)
    sizes = np.select(
        [~known, p == 0, p == 1], [default_size, zero_size, one_size], default=min_size
    ).astype(np.int64)
    remaining = int(budget) - int(sizes.sum())
    if remaining < 0:
        raise ValueError(
            f"budget: {budget} is below the {int(sizes.sum())} samples the floors take "
            f"(default_size for unknown prompts, min/zero/one_size for known ones)"
        )
    if not effective.any():
        _spread_evenly(sizes, zero_or_unknown if zero_or_unknown.any() else ~effective, remaining)
        return KnapsackAllocation(sizes, effective, False, 1.0)

    outside = zero_or_unknown if zero_or_unknown.any() else ~effective
    extra_cap = max_size - min_size
    costs = knapsack_cost(p[effective], confidence, cost_estimate)
    estimated = int(np.floor(np.minimum(max_size, costs)).sum())
    redistributed, ratio = False, 1.0
    if redistribute_excess and estimated < remaining and outside.any():
        redistributed, ratio = True, estimated / remaining
        _spread_evenly(sizes, outside, remaining - estimated)
        remaining = estimated
    capacity = extra_cap * int(effective.sum())
    take = min(remaining, capacity)
    sizes[effective] += _largest_marginal_values(p[effective], min_size, extra_cap, take)
    if remaining > take:
        if not outside.any():
            raise ValueError(
                f"max_size: {int(effective.sum())} prompts x max_size={max_size} cannot hold "
                f"budget={budget}"
            )
        _spread_evenly(sizes, outside, remaining - take)
    return KnapsackAllocation(sizes, effective, redistributed, ratio)


def _largest_marginal_values(p: np.ndarray, floor: int, extra_cap: int, take: int) -> np.ndarray:
    """Extra samples k_i per prompt from the `take` largest marginal values of f_i (concave)."""
    extras = np.zeros(p.size, dtype=np.int64)
    if take <= 0 or extra_cap <= 0:
        return extras
    q = 1.0 - p
    n = floor + np.arange(1, extra_cap + 1)[None, :]  # (1, K): total size after the k-th extra
    c = (p * q * q)[:, None]
    # f(k) - f(k-1) = v(n) - v(n-1) = c (p^(n-1) q + q^(n-1) p) in closed form, no cancellation;
    # the first extra is worth all of v(floor + 1), as f(0) = 0.
    gains = c * (p[:, None] ** (n - 1) * q[:, None] + q[:, None] ** (n - 1) * p[:, None])  # (B, K)
    gains[:, 0] = knapsack_value(p, floor + 1)
    prompt = np.broadcast_to(np.arange(p.size)[:, None], gains.shape)
    # Rows decrease strictly, so the top `take` entries are a prefix of each row; order by value
    # (descending), then prompt index, for a deterministic choice among ties.
    order = np.lexsort((prompt.ravel(), -gains.ravel()))[:take]
    np.add.at(extras, prompt.ravel()[order], 1)
    return extras


def _spread_evenly(sizes: np.ndarray, mask: np.ndarray, amount: int) -> None:
    """Add `amount` to the prompts in `mask` as evenly as possible, lower indices first."""
    targets = np.flatnonzero(mask)
    if amount <= 0 or targets.size == 0:
        return
    base, extra = divmod(amount, targets.size)
    sizes[targets] += base
    sizes[targets[:extra]] += 1


def _validate(p, known, budget, default_size, min_size, max_size, zero_size, one_size, confidence):
    if p.ndim != 1 or known.shape != p.shape:
        raise ValueError(
            f"success_rates and known must be 1-D of one length, got {p.shape} and {known.shape}"
        )
    bad = np.flatnonzero(known & ~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"success_rates[{bad[0]}] = {p[bad[0]]}: must be in [0, 1]")
    for name, value, lowest in (
        ("budget", budget, 0),
        ("default_size", default_size, 0),
        ("min_size", min_size, 1),
        ("zero_size", zero_size, 0),
        ("one_size", one_size, 0),
    ):
        if int(value) != value or value < lowest:
            raise ValueError(f"{name}: must be an integer >= {lowest}, got {value}")
    if int(max_size) != max_size or max_size < min_size:
        raise ValueError(f"max_size: must be an integer >= min_size={min_size}, got {max_size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
