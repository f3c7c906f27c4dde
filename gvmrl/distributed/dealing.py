"""Which rank does what: prompts and samples dealt to ranks by expected tokens (pure numpy).

After the one global allocation every rank knows the sizes n_i. The samples, (prompt i, k) for
k < n_i, are dealt to ranks so that each rank's expected tokens are nearly equal: a prompt with
60 samples is spread over ranks rather than landing on one. Each sample's randomness comes from
`sample_seeds` of its global (prompt, k), never from its rank or its position in a rank's
batch, so the set of samples does not depend on the number of ranks.
"""

from __future__ import annotations

import heapq

import numpy as np


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014): a bijective 64-bit mix, wrapping uint64."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(base_seed: int, prompt_index, sample_index) -> np.ndarray:
    """Seed of each sample from its global (prompt index in the iteration, sample index k).

    `base_seed` identifies the run, iteration and phase (the trainer's `derive_seed(seed,
    iteration, phase)`). Chained splitmix64, vectorised: equal inputs give equal seeds whatever
    rank computes them; distinct (prompt, k) collide with probability ~2^-64.
    Returns uint64 seeds with the broadcast shape of the indices.
    """
    prompts = np.asarray(prompt_index)
    samples = np.asarray(sample_index)
    if (prompts < 0).any() or (samples < 0).any():
        raise ValueError("prompt and sample indices must be >= 0")
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(np.broadcast(prompts, samples).shape, base_seed, dtype=np.uint64))
        h = _splitmix64(h ^ prompts.astype(np.uint64))
        return _splitmix64(h ^ samples.astype(np.uint64))


def sample_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """(prompt index, sample index k) of every sample (i, k), k < sizes[i], in the canonical
    prompt-then-sample order: two (sum(sizes),) int64 arrays."""
    sizes = np.asarray(sizes, dtype=np.int64)
    prompt = np.repeat(np.arange(sizes.size), sizes)
    return prompt, np.arange(prompt.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def _least_loaded(costs: np.ndarray, world: int) -> np.ndarray:
    """Owner rank of each item: largest first (stable), each to the rank with the least load so
    far (lowest rank on ties). Any rank's load then exceeds any other's by at most one item."""
    owner = np.empty(costs.size, dtype=np.int64)
    heap = [(0.0, r) for r in range(world)]
    for item in np.argsort(-costs, kind="stable"):
        load, rank = heapq.heappop(heap)
        owner[item] = rank
        heapq.heappush(heap, (load + float(costs[item]), rank))
    return owner


def _check_world(world: int) -> None:
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")


def deal_samples(sizes, expected_tokens, world: int) -> list[np.ndarray]:
    """Deal every sample (i, k), k < sizes[i], to exactly one of `world` ranks, balancing tokens.

    Args:
        sizes: (B,) int >= 0, samples per prompt after the global allocation.
        expected_tokens: (B,) float >= 0, expected tokens of one sample of prompt i (e.g. its
            prompt length plus the mean response length of its pre-samples).
        world: number of ranks.
    Returns:
        One (m_r, 2) int64 array of (prompt, k) rows per rank, in (prompt, k) order. The ranks'
        expected tokens differ by at most the largest single sample's. Deterministic.
    """
    _check_world(world)
    sizes = np.asarray(sizes)
    tokens = np.asarray(expected_tokens, dtype=np.float64)
    if sizes.ndim != 1 or tokens.shape != sizes.shape:
        raise ValueError(
            "sizes and expected_tokens must be 1-D of one length, "
            f"got {sizes.shape}, {tokens.shape}"
        )
    if (sizes < 0).any() or not np.isfinite(tokens).all() or (tokens < 0).any():
        raise ValueError("sizes must be >= 0 and expected_tokens finite and >= 0")
    prompt, k = sample_indices(sizes)  # (N,) each, canonical order: prompt, then k
    owner = _least_loaded(tokens[prompt], world)
    pairs = np.stack([prompt, k], axis=1)
    return [pairs[owner == r] for r in range(world)]


def split_prompts(costs, world: int) -> list[np.ndarray]:
    """Deal whole prompts to ranks (pre-sampling: each rank samples and grades all N' pre-samples
    of its prompts), balancing `costs` (B,), e.g. expected tokens x N'. Sorted prompt indices per
    rank; each prompt on exactly one rank."""
    _check_world(world)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 1 or not np.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be 1-D, finite and >= 0")
    owner = _least_loaded(costs, world)
    return [np.flatnonzero(owner == r) for r in range(world)]


def request_counts(share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rank's (m, 2) share as an engine request: (distinct prompts, samples of each)."""
    prompts, counts = np.unique(share[:, 0], return_counts=True)
    return prompts, counts
