"""DAPO's dynamic sampling: keep only groups that teach something, draw more until enough do.

DAPO (arXiv 2503.14476, Sec. 3.2, Eq. 11 constraint 0 < |{o_i : is_equivalent(a, o_i)}| < G)
over-samples and filters out prompts whose group rewards are all equal, since GRPO gives them
zero advantage. verl's implementation (recipe/dapo/dapo_ray_trainer.py), restated:

- a group is kept if the population std of its rewards is > 0, or if it holds one sample;
- each generation round draws a fixed batch of `gen_batch_size` prompts with n samples each;
  kept groups accumulate across rounds until there are `train_batch_size` of them;
- then the batch is cut to its first train_batch_size * n trajectories, i.e. the first
  `train_batch_size` kept groups in draw order; the surplus is generated and discarded;
- at `max_num_gen_batches` rounds without enough groups verl raises an error (0 = no cap).
  Here the iteration instead trains on the groups it has and reports the shortfall.

GRESO (arXiv 2506.02177, its verl fork) sizes the next round from the last one's zero-variance
share instead: int(missing_samples / (1 - share) / n * 1.25), at most the fixed round size and at
least a floor (64); `prompts_for_next_round` offers both.

Rewards come flat with each sample's prompt index, as `Rollouts` holds them.
"""

from __future__ import annotations

import numpy as np


def informative_groups(rewards, group, num_groups: int) -> np.ndarray:
    """Which groups DAPO keeps: rewards not all equal (std > 0), or a single sample (as verl).

    Args:
        rewards: (N,) rewards of the samples (`Rollouts.scores`).
        group: (N,) int, each sample's prompt index in [0, num_groups) (`Rollouts.group`).
        num_groups: B, the prompts drawn; one with no sample is not informative.

    Returns:
        (B,) bool. std > 0 is tested as max > min, which is the same for finite rewards and
        free of rounding.
    """
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(group, dtype=np.int64)
    if r.ndim != 1 or g.shape != r.shape:
        raise ValueError(f"rewards and group must be 1-D of one length, got {r.shape}, {g.shape}")
    if g.size and (g.min() < 0 or g.max() >= num_groups):
        raise ValueError(f"group: indices must lie in [0, {num_groups})")
    highest = np.full(num_groups, -np.inf)
    lowest = np.full(num_groups, np.inf)
    np.maximum.at(highest, g, r)
    np.minimum.at(lowest, g, r)
    counts = np.bincount(g, minlength=num_groups)
    return (counts == 1) | ((counts > 1) & (highest > lowest))


def prompts_for_next_round(
    groups_missing: int,
    informative_share: float | None,
    samples_per_prompt: int,
    *,
    gen_batch_size: int,
    adaptive: bool = False,
    headroom: float = 1.25,
    min_prompts: int = 1,
) -> int:
    """Prompts to draw in the next round.

    verl (adaptive=False): always `gen_batch_size`. GRESO (adaptive=True): the prompts expected
    to yield the missing groups at the last round's informative share, with headroom,

        clip(int(groups_missing * n / share / n * headroom), min_prompts, gen_batch_size),

    (their formula counts samples, missing groups times n; the n cancels with fixed n), and
    `gen_batch_size` when no information is available (share None or 0).

    Args:
        groups_missing: informative groups still needed (> 0).
        informative_share: share of the last round's groups that were informative, in [0, 1].
        samples_per_prompt: n.
        gen_batch_size: the fixed round size, and the adaptive size's cap.
        adaptive, headroom, min_prompts: GRESO's variant (their floor is 64 prompts).
    """
    if groups_missing <= 0:
        raise ValueError(f"groups_missing: must be > 0, got {groups_missing}")
    if not adaptive or not informative_share:
        return int(gen_batch_size)
    missing_samples = groups_missing * samples_per_prompt
    estimate = int(missing_samples / informative_share / samples_per_prompt * headroom)
    return int(min(max(estimate, min_prompts), gen_batch_size))


def should_stop(groups_kept: int, target_groups: int, rounds_done: int, max_rounds: int) -> bool:
    """Stop drawing once `target_groups` informative groups are in, or after `max_rounds`."""
    return groups_kept >= target_groups or rounds_done >= max_rounds


def trim_to_target(informative, target_groups: int) -> np.ndarray:
    """Indices of the groups to train on: the first `target_groups` informative ones.

    Args:
        informative: (B_total,) bool over every group drawn this iteration, in draw order.
        target_groups: the train batch size in prompts.

    Returns:
        (min(target, kept),) int64 indices; fewer than the target when the rounds ran out.
    """
    return np.flatnonzero(np.asarray(informative, dtype=bool))[:target_groups]
