"""Expected error of the M-step gradient estimate under a sample allocation.

GVM chooses n_i to shrink the variance of the M-step gradient. Whether that pays for its
pre-samples depends on how much of the update's noise the allocation can reach at all: the noise
of drawing responses (which n_i controls) sits next to the noise of drawing the batch of prompts
(which no allocation touches). These pure functions give the expected squared error exactly from
per-prompt moments measured on a large pool of samples, so allocations can be compared without
training (bench/variance.py).

Model. Prompt i's responses are accepted with probability p_i; an accepted response has gradient
h with mean mu_i and spread s_i^2 = E||h - mu_i||^2. The RAFT/RAFT++ M-step with prompt-mean
aggregation averages h over the accepted samples among the n_i drawn and gets 0 when none is
accepted. With K ~ Binomial(n_i, p_i) accepted samples, drawn independently,

    E||estimate_i - mu_i||^2 = s_i^2 E[1/K; K >= 1] + ||mu_i||^2 P(K = 0)

and the batch estimate (1/B) sum_i estimate_i errs by (1/B^2) sum_i of these.
"""

from __future__ import annotations

import numpy as np


def inverse_binomial_moment(sizes, accept_rates) -> np.ndarray:
    """E[1/K; K >= 1] for K ~ Binomial(n, p), elementwise over broadcast `sizes` and `accept_rates`.

    The average of K accepted samples has 1/K of one sample's variance; this is that factor
    averaged over how many of the n draws are accepted (0 for n = 0 or p = 0; 1/n for p = 1).
    """
    n, p = np.broadcast_arrays(
        np.asarray(sizes, dtype=np.int64), np.asarray(accept_rates, dtype=np.float64)
    )
    if n.size == 0:
        return np.zeros(n.shape)
    if (n < 0).any() or ((p < 0) | (p > 1)).any():
        raise ValueError("sizes must be >= 0 and accept rates in [0, 1]")
    largest = max(int(n.max()), 1)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, largest + 1)))])
    k = np.arange(1, largest + 1)  # (M,)
    n_, p_ = n[..., None], p[..., None]  # (..., 1)
    rejected = np.clip(n_ - k, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = (
            log_factorial[n_]
            - log_factorial[np.minimum(k, n_)]
            - log_factorial[rejected]
            + k * np.log(p_)
            + np.where(rejected > 0, rejected * np.log1p(-p_), 0.0)
        )
    pmf = np.where(k <= n_, np.exp(log_pmf), 0.0)
    return (pmf / k).sum(axis=-1)


def accepted_mean_error(sizes, accept_rates, spread, mean_sq) -> np.ndarray:
    """(B,) expected squared error of each prompt's accepted-sample mean gradient (module doc).

    sizes: n_i samples drawn; accept_rates: p_i; spread: s_i^2 of accepted gradients around their
    mean; mean_sq: ||mu_i||^2, the error when no sample is accepted.
    """
    n = np.asarray(sizes, dtype=np.int64)
    p = np.asarray(accept_rates, dtype=np.float64)
    none_accepted = (1.0 - p) ** n
    return np.asarray(spread) * inverse_binomial_moment(n, p) + np.asarray(mean_sq) * none_accepted


def best_sizes(errors: np.ndarray, budget: int) -> np.ndarray:
    """Sizes n_i summing to `budget` that minimise sum_i errors[i, n_i], one sample at a time.

    errors: (B, M+1), prompt i's error with 0..M samples (M >= budget). Each sample goes to the
    prompt whose error it lowers most; for errors convex in n (as accepted_mean_error is for
    the sizes that matter) this greedy choice is the optimum, the yardstick for any allocation.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if budget > errors.shape[1] - 1:
        raise ValueError(f"budget {budget} exceeds the {errors.shape[1] - 1} sizes tabulated")
    sizes = np.zeros(errors.shape[0], dtype=np.int64)
    rows = np.arange(errors.shape[0])
    for _ in range(budget):
        gain = errors[rows, sizes] - errors[rows, np.minimum(sizes + 1, errors.shape[1] - 1)]
        sizes[int(np.argmax(gain))] += 1
    return sizes
