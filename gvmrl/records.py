"""Record types shared across layers: a prompt with its reference answer, and graded rollouts.

They live here, below `gvmrl.data`, the built-in task, the allocation rules and the trainer, so
that each of those can build or consume them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gvmrl.rollout.base import Sample

Answer = str | list[str]

# A sample is accepted (kept by rejection sampling, counted in the accept rate p_i) when its score
# is at least this. The rewards of gvmrl are 0 or 1, on which ">= 0.5" and "> 0.5" agree; ">="
# counts a partial score of exactly 0.5 as accepted.
ACCEPT_THRESHOLD = 0.5


def is_accepted(scores, threshold: float = ACCEPT_THRESHOLD) -> np.ndarray:
    """(N,) bool: which of the (N,) scores are accepted."""
    return np.asarray(scores, dtype=np.float64) >= threshold


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a stable id, the problem text (no instruction, no template) and its answer."""

    id: str
    problem: str
    answer: Answer


@dataclass
class Rollouts:
    """Graded samples of one iteration phase. `group[j]` is sample j's prompt index in the batch."""

    samples: list[Sample]
    scores: np.ndarray  # (N,) float
    group: np.ndarray  # (N,) int

    @staticmethod
    def concat(a: Rollouts, b: Rollouts) -> Rollouts:
        return Rollouts(
            a.samples + b.samples,
            np.concatenate([a.scores, b.scores]),
            np.concatenate([a.group, b.group]),
        )

    def select(self, keep: np.ndarray) -> Rollouts:
        idx = np.flatnonzero(keep)
        return Rollouts([self.samples[i] for i in idx], self.scores[idx], self.group[idx])

    @property
    def accepted(self) -> np.ndarray:
        """(N,) bool: the accepted samples (`is_accepted`)."""
        return is_accepted(self.scores)

    @property
    def tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)
