"""The M-step algorithms as named units: which samples each trains on, its advantage estimator and
its per-token loss (`ALGORITHMS`, filled by `register_algorithm`, as verl registers its policy
losses and advantage estimators).

The trainer looks the configured algorithm up once and calls its three parts; it never switches on
the name. Reduction of the per-token loss (`loss.aggregation`), the KL penalty and the entropy
bonus are shared by all algorithms and applied by the trainer.

- raft    (Dong et al. 2023): supervised fine-tuning on the accepted samples (rejection sampling).
- raft++  (Xiong et al. 2025, arXiv 2504.11343; the GVM paper's RAFT++): the accepted samples,
          with PPO-style importance clipping of A = max(r, 0).
- grpo    (DeepSeekMath, Shao et al. 2024): every sample, group-normalised advantages, the same
          clipped surrogate.

An allocation rule that knows each prompt's reward mean and std from more samples than the M-step
trains on (Reinforce-Ada's "global statistics") hands them to the advantage estimator as a
`GroupBaseline`; estimators without a baseline ignore it.

To add an algorithm, write its three functions (pure: tensors and config in, tensors out) and
register an `Algorithm` under a new name; `config.validate` accepts every registered name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from gvmrl.allocation_rules.reinforce_ada import global_advantages
from gvmrl.losses import clipped_policy_loss, compute_advantages, raft_loss
from gvmrl.records import is_accepted

if TYPE_CHECKING:
    from gvmrl.config import LossConfig

# (scores (N,)) -> (N,) bool: the samples the M-step trains on.
SampleFilter = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GroupBaseline:
    """Per-prompt reward mean and standard deviation, indexed by group id: the baseline of the
    advantages when an allocation rule estimated it from every sample it drew for the prompt,
    not only the ones trained on (Reinforce-Ada, arXiv 2510.04996)."""

    mean: np.ndarray
    std: np.ndarray


# (scores (N,), group ids (N,), loss config, baseline or None) -> advantages (N,)
AdvantageFn = Callable[[Tensor, Tensor, "LossConfig", GroupBaseline | None], Tensor]
# (log-probs (N,T), sampling log-probs (N,T), advantages (N,), response mask (N,T), loss config)
#   -> (per-token loss (N,T), 0 off the mask; {metric name: 0-dim tensor})
PerTokenLossFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, "LossConfig"], tuple[Tensor, dict[str, Tensor]]
]


@dataclass(frozen=True)
class Algorithm:
    """One M-step algorithm."""

    name: str
    trains_on: SampleFilter
    advantages: AdvantageFn
    per_token_loss: PerTokenLossFn


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add `algorithm` to `ALGORITHMS` under its name (a name may be registered once)."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


# ----------------------------------------------------------------------------------------------
# The parts


def accepted_samples(scores: np.ndarray) -> np.ndarray:
    """Rejection sampling: only the accepted samples (`gvmrl.records.is_accepted`)."""
    return is_accepted(scores)


def every_sample(scores: np.ndarray) -> np.ndarray:
    return np.ones(len(scores), dtype=bool)


def raft_advantages(
    scores: Tensor, group_ids: Tensor, loss: LossConfig, baseline: GroupBaseline | None = None
) -> Tensor:
    """A = max(r, 0) (`gvmrl.losses.raft_advantages`); RAFT's loss ignores it, but the share of
    zero advantages is reported for every algorithm. RAFT has no baseline to replace."""
    return compute_advantages("raft++", scores, group_ids)


def grpo_advantages(
    scores: Tensor, group_ids: Tensor, loss: LossConfig, baseline: GroupBaseline | None = None
) -> Tensor:
    """Group-normalised rewards, divided by the group's std unless `loss.grpo_scale_by_std` is off
    (Dr. GRPO); with a `baseline`, centred on and scaled by its per-prompt mean and std instead
    of the trained group's."""
    if baseline is not None:
        index = group_ids.cpu().numpy()
        advantages = global_advantages(
            scores.cpu().numpy(),
            baseline.mean[index],
            baseline.std[index],
            scale_by_std=loss.grpo_scale_by_std,
        )
        return torch.as_tensor(advantages, dtype=torch.float32, device=scores.device)
    estimator = "grpo" if loss.grpo_scale_by_std else "grpo-no-std"
    return compute_advantages(estimator, scores, group_ids)


def negative_log_likelihood(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, loss: LossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """RAFT: supervised fine-tuning, -log pi on every response token (no advantage, no ratio)."""
    return raft_loss(logp, mask), {}


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, loss: LossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with the `loss` section's clip range and dual-clip."""
    return clipped_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        dual_clip=loss.dual_clip,
    )


register_algorithm(Algorithm("raft", accepted_samples, raft_advantages, negative_log_likelihood))
register_algorithm(Algorithm("raft++", accepted_samples, raft_advantages, clipped_surrogate))
register_algorithm(Algorithm("grpo", every_sample, grpo_advantages, clipped_surrogate))
