"""Reinforce-Ada: sample in rounds, retire a prompt once its group can teach (arXiv 2510.04996).

Facts from the authors' verl fork (RLHFlow/Reinforce-Ada, `_generate_multi_round_adaptive_
downsampling` in verl/trainer/ppo/ray_trainer.py and `compute_grpo_outcome_advantage` in
core_algos.py), restated:

- Every active prompt gets `round_repeat` samples per round (default 8), for at most
  `max_rounds` rounds (default 4). A sample is positive if its reward > `positive_threshold`
  (0.7), else negative; counts accumulate over rounds.
- Exit rule, checked after each round on the accumulated counts, K = final group size (the
  rollout n; 4 in their script):
    "balanced" (their default and best): positives >= K // 2 and negatives >= K - K // 2;
    "positive_focused" (Reinforce-Ada-pos): positives >= 1.
  A retired prompt gets no more samples.
- The training group is K samples: for a retired prompt the first min(K // 2, pos) positives and
  the first min(K - that, neg) negatives, topped up from the positives, then the negatives, if
  short. A prompt still active after the last round keeps min(K, pos + neg) samples: "balanced"
  aims at K // 2 positives and K - K // 2 negatives; "positive_focused" at
  clip(ceil(pos / (pos + neg) * K), 1, take - 1) positives and the rest negatives; each topped up
  from the positives, then the negatives.
- Advantages use every sample drawn for the prompt ("global statistics", `global_stat_est`):
  mean = pos / (pos + neg), std = the unbiased std of those 0/1 outcomes (clamped at eps), and
  A = r - mean, divided by (std + eps) only if scaling by std (their script does not scale).
  With pos + neg <= 1 the baseline is mean 0, std 1.

The authors' loop has no per-iteration budget beyond max_rounds * round_repeat per prompt;
`round_sizes` adds one (rules are compared at equal generation): when the remaining budget
cannot give every active prompt `round_repeat`, it is split evenly, lower indices first.
"""

from __future__ import annotations

import math

import numpy as np

EXIT_RULES = ("balanced", "positive_focused")


def still_active(positives, negatives, group_size: int, exit_rule: str = "balanced") -> np.ndarray:
    """(B,) bool: prompts whose accumulated counts do not yet meet the exit rule.

    Args:
        positives, negatives: (B,) samples so far above / not above the threshold.
        group_size: K, the final training group size (>= 1).
        exit_rule: "balanced" or "positive_focused" (module docstring).
    """
    pos = np.asarray(positives, dtype=np.int64)
    neg = np.asarray(negatives, dtype=np.int64)
    if exit_rule == "balanced":
        done = (pos >= group_size // 2) & (neg >= group_size - group_size // 2)
    elif exit_rule == "positive_focused":
        done = pos >= 1
    else:
        raise ValueError(f"exit_rule: unknown {exit_rule!r}; choose one of {EXIT_RULES}")
    return ~done


def round_sizes(active, round_repeat: int, remaining_budget: int | None = None) -> np.ndarray:
    """(B,) int64 samples each prompt gets in the next round: `round_repeat` per active prompt,
    or the remaining budget split evenly over them (lower indices first) when it falls short.
    Inactive prompts get 0; the total never exceeds `remaining_budget`."""
    active = np.asarray(active, dtype=bool)
    sizes = np.where(active, int(round_repeat), 0).astype(np.int64)
    if remaining_budget is None or sizes.sum() <= remaining_budget:
        return sizes
    targets = np.flatnonzero(active)
    base, extra = divmod(max(int(remaining_budget), 0), targets.size)
    sizes[targets] = base
    sizes[targets[:extra]] += 1
    return sizes


def select_group(
    is_positive, group_size: int, finished: bool, exit_rule: str = "balanced"
) -> np.ndarray:
    """Indices (into the prompt's samples, in generation order) of its training group.

    Args:
        is_positive: (M,) bool, every sample drawn for the prompt, in generation order.
        group_size: K.
        finished: whether the prompt met its exit rule (else it ran out of rounds or budget).
        exit_rule: as in `still_active`.

    Returns:
        Sorted int64 indices: min(K, M) of them (module docstring for which).
    """
    if exit_rule not in EXIT_RULES:
        raise ValueError(f"exit_rule: unknown {exit_rule!r}; choose one of {EXIT_RULES}")
    labels = np.asarray(is_positive, dtype=bool)
    pos_idx, neg_idx = np.flatnonzero(labels), np.flatnonzero(~labels)
    take = min(group_size, labels.size)
    if take == 0:
        return np.zeros(0, dtype=np.int64)
    if finished or exit_rule == "balanced":
        n_pos = min(group_size // 2, pos_idx.size)
        n_neg = min(take - n_pos, neg_idx.size)
    else:  # a positive-focused prompt out of rounds keeps its observed share, one of each if it can
        want_pos = max(min(math.ceil(pos_idx.size / labels.size * group_size), take - 1), 1)
        n_pos = min(want_pos, pos_idx.size)
        n_neg = min(take - want_pos, neg_idx.size)
    more_pos = min(pos_idx.size - n_pos, take - n_pos - n_neg)  # top up: positives first
    n_pos += more_pos
    n_neg += min(neg_idx.size - n_neg, take - n_pos - n_neg)
    return np.sort(np.concatenate([pos_idx[:n_pos], neg_idx[:n_neg]]))


def global_baseline(positives, negatives, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (mean, std) of all its 0/1 outcomes: the "global statistics" baseline.

    mean = pos / T, std = sqrt(pos * neg / (T (T - 1))) (the unbiased std of T = pos + neg
    outcomes), clamped below at eps; (0, 1) where T <= 1.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    total = pos + neg
    many = total > 1
    mean = np.zeros_like(total)
    std = np.ones_like(total)
    mean[many] = pos[many] / total[many]
    std[many] = np.maximum(np.sqrt(pos[many] * neg[many] / (total[many] * (total[many] - 1))), eps)
    return mean, std


def global_advantages(
    rewards, mean: float, std: float, scale_by_std: bool = False, eps: float = 1e-6
) -> np.ndarray:
    """A_j = r_j - mean, or (r_j - mean) / (std + eps) when `scale_by_std` (GRPO's scaling; the
    authors' script leaves it off, as Dr. GRPO), for the selected samples of one prompt."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - mean) / (std + eps) if scale_by_std else r - mean
