"""GRESO: skip, before rollout, the prompts whose history predicts all-equal rewards.

"Act Only When It Pays" (arXiv 2506.02177, Sec. 4, Alg. 1) observes that a prompt whose group
had zero reward variance tends to have it again at its next visit, and skips such prompts with a
probability that grows with the streak. Facts from the authors' verl fork (Infini-AI-Lab/GRESO,
verl/trainer/ttis/presampling_selector.py `easy/hard_probabilistic_skip` and ray_trainer.py):

- Per prompt, z_easy = the number of latest consecutive visits in which every sample was
  correct (their mean reward >= 0.98) and z_hard = the same for all wrong (mean <= 0.11); with 0/1
  rewards and at most 9 samples per visit these are exactly "all accepted" / "all rejected"
  (`PromptHistory.zero_variance_streaks`). Skipped iterations add nothing to the history: the
  streak counts visits, so the skip probability depends on how often the prompt *was sampled*
  with zero variance, not on how long it has been skipped.
- Keep (explore) probability max(p_easy^z_easy, 0.01), i.e. skip probability
  1 - max(p_easy^z_easy, 0.01), and likewise with p_hard; a prompt with both streaks 0 (or
  never seen) is always kept. Their code draws the easy test, then the hard one.
- p_easy and p_hard (both start at 0.5) adapt after every training step, from the second epoch
  on: with target zero-variance share t (0.25), the easy target is t / 3 and the hard target
  2 t / 3 (hard prompts get more exploration, as rewards rise in training). If the share of
  all-correct groups among the step's generated groups is >= its target, p_easy -= 0.01 (skip
  more), else p_easy += 0.01, clipped to [0.05, 0.95]; the same for p_hard with all-wrong groups.
- In the paper GRESO filters the prompt stream that feeds DAPO's dynamic sampling (`dapo`).
"""

from __future__ import annotations

import numpy as np

MIN_KEEP_PROBABILITY = 0.01  # the authors' floor on the keep probability


def skip_probability(
    all_correct_streak,
    all_wrong_streak,
    p_easy: float,
    p_hard: float,
    min_keep: float = MIN_KEEP_PROBABILITY,
) -> np.ndarray:
    """(B,) probability of skipping each prompt this iteration.

    1 - (1 - s_easy)(1 - s_hard) with s = 1 - max(p^z, min_keep) for z > 0 and s = 0 for z = 0:
    the two independent tests of the authors' code (one streak is always 0 in practice).

    Args:
        all_correct_streak, all_wrong_streak: (B,) z_easy and z_hard, integers >= 0.
        p_easy, p_hard: the exploration bases in (0, 1].
        min_keep: floor of the keep probability (0.01).
    """
    keep = np.ones(np.shape(all_correct_streak), dtype=np.float64)
    for streak, base in ((all_correct_streak, p_easy), (all_wrong_streak, p_hard)):
        z = np.asarray(streak, dtype=np.float64)
        if np.any(z < 0):
            raise ValueError("zero-variance streaks must be >= 0")
        keep *= np.where(z > 0, np.maximum(base**z, min_keep), 1.0)
    return 1.0 - keep


def decide_skips(skip_probabilities, rng: np.random.Generator) -> np.ndarray:
    """(B,) bool, True for the prompts to skip: one uniform draw per prompt from `rng`."""
    probs = np.asarray(skip_probabilities, dtype=np.float64)
    return rng.random(probs.shape) < probs


def adapt_exploration_base(
    base: float,
    observed_share: float,
    target_share: float,
    step: float = 0.01,
    lower: float = 0.05,
    upper: float = 0.95,
) -> float:
    """One adaptation step of p_easy or p_hard: lower it (skip more) when the observed share of
    all-correct (or all-wrong) groups reached its target, else raise it; clipped to
    [lower, upper]."""
    if observed_share >= target_share:
        return max(base - step, lower)
    return min(base + step, upper)


def zero_variance_shares(accepted, samples) -> tuple[float, float]:
    """(all-correct share, all-wrong share) among the groups with samples, as GRESO's targets
    count them (every group generated in the step, dropped ones included)."""
    acc = np.asarray(accepted, dtype=np.int64)
    n = np.asarray(samples, dtype=np.int64)
    drawn = n > 0
    if not drawn.any():
        return 0.0, 0.0
    return float(np.mean(acc[drawn] == n[drawn])), float(np.mean(acc[drawn] == 0))


def easy_and_hard_targets(target_zero_variance: float) -> tuple[float, float]:
    """The authors' split of the zero-variance target: a third for all-correct groups, two
    thirds for all-wrong ones."""
    return target_zero_variance / 3, target_zero_variance * 2 / 3
