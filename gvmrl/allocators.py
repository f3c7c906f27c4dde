"""Sample allocation rules as named units: given an iteration's prompts, how many samples each gets.

Every rule implements `Allocator`: `allocate(prompts, context)` may draw pre-samples through
`context.sample` and returns an `Allocation`: the per-prompt sizes n_i of the iteration's main
sampling phase, the pre-sample rollouts (if any) and whether the M-step trains on them, and the
rule's metrics. `ALLOCATORS` maps the `allocation` config key to a rule class (filled by
`register_allocator`); each rule reads its options from its own config section (gvm: `gvm`).

What the interface leaves room for (further rules plug in without trainer changes):
- rules that sample in rounds (DAPO dynamic sampling, Reinforce-Ada) call `context.sample` once
  per round with `round=0, 1, ...` (each round its own seed; every call counts toward the run's
  generated samples) and return what they drew as `presamples`, with sizes of 0 where they are
  done;
- rules that keep per-prompt history across iterations (gvm-history, GRESO) keep it in the
  object and return it from `state_dict()`; the trainer saves that in every checkpoint
  (state.json, so it must be JSON-ready) and hands it to `load_state_dict` on resume;
- rules that are a pure function of per-prompt statistics (knapsack) compute the statistics and
  call their pure function, as `GVMAllocator` calls `gvmrl.allocation.allocate`;
- rules that learn from the main samples (per-prompt history) get them through `observe`, after
  grading and before the update;
- rules that draw more prompts than the iteration's batch (DAPO) take them from
  `context.more_prompts`, and rules that choose what to train on among what they drew return it
  as `training` (with a per-prompt reward baseline for the advantages, if they have one).

The further rules (gvm-history, knapsack, dapo, reinforce-ada, greso) live in
`gvmrl.adaptive_allocators`, imported at the end of this module so that `ALLOCATORS` always holds
every rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gvmrl.algorithms import GroupBaseline
from gvmrl.allocation import allocate
from gvmrl.estimation import prompt_stats
from gvmrl.records import PromptRecord, Rollouts
from gvmrl.rollout.base import Sample

if TYPE_CHECKING:
    from gvmrl.config import TrainConfig


class Sampler(Protocol):
    def __call__(
        self, prompts: list[PromptRecord], sizes: Sequence[int], round: int = 0
    ) -> Rollouts:
        """sizes[i] graded samples of prompts[i] from the current policy (round r of this
        iteration's pre-sampling: each round draws with its own seed)."""
        ...


# (samples, parameter group, micro-batch size) -> (n,) exact per-sample gradient norms
GradNorms = Callable[[list[Sample], str, int], np.ndarray]
# (count, round, ids to leave out) -> up to `count` further training prompts, the same on resume
MorePrompts = Callable[[int, int, set[str]], list[PromptRecord]]


@dataclass
class AllocationContext:
    """What the trainer offers an allocation rule in one iteration."""

    sample: Sampler
    grad_norms: GradNorms
    timer: Callable[[str], AbstractContextManager[None]]
    """`with context.timer("presample"):` records the phase's wall time as time_presample."""
    log: Callable[[str], None]
    """A line for the user (progress display)."""
    more_prompts: MorePrompts | None = None
    """Training prompts beyond the iteration's batch, a pure function of (run seed, iteration,
    round), so that a resumed run draws the same ones (`PromptStream.extra`)."""
    train_set_size: int = 0
    """Prompts in the training set (one epoch)."""


@dataclass
class Allocation:
    """A rule's decision for one iteration."""

    sizes: np.ndarray
    """(B,) int: samples to draw for each prompt in the main sampling phase."""
    presamples: Rollouts | None = None
    """What the rule drew itself (pre-samples, rounds), counted as generated."""
    train_on_presamples: bool = False
    """Whether the M-step trains on `presamples` besides the main samples."""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: Rollouts | None = None
    """What the M-step trains on besides the main samples, chosen by the rule among what it drew
    (DAPO's informative groups, Reinforce-Ada's balanced groups), with group ids in
    [0, prompts_per_iteration); takes the place of `presamples` in the M-step."""
    baseline: GroupBaseline | None = None
    """Per-prompt reward mean and std for the advantages (indexed by group id), when the rule
    has them from more samples than it trains on (Reinforce-Ada); None: each group's own."""

    def training_rollouts(self, rollouts: Rollouts) -> Rollouts:
        """The rollouts of the M-step: the main samples, after the rule's chosen samples or the
        pre-samples when trained on."""
        if self.training is not None:
            return Rollouts.concat(self.training, rollouts)
        if self.presamples is not None and self.train_on_presamples:
            return Rollouts.concat(self.presamples, rollouts)
        return rollouts


class Allocator(Protocol):
    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation: ...

    def observe(
        self, prompts: list[PromptRecord], rollouts: Rollouts, context: AllocationContext
    ) -> None:
        """The iteration's graded main samples, before the update (rules with history)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ALLOCATORS: dict[str, Callable[[TrainConfig], Allocator]] = {}


def register_allocator(name: str) -> Callable[[type], type]:
    """Class decorator: `ALLOCATORS[name] = cls`; the class is built as `cls(config)`."""

    def register(cls: type) -> type:
        if name in ALLOCATORS:
            raise ValueError(f"allocation rule {name!r} is already registered")
        ALLOCATORS[name] = cls
        return cls

    return register


def make_allocator(config: TrainConfig) -> Allocator:
    return ALLOCATORS[config.allocation](config)


class Stateless:
    """For rules that carry nothing from one iteration to the next."""

    def observe(
        self, prompts: list[PromptRecord], rollouts: Rollouts, context: AllocationContext
    ) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register_allocator("uniform")
class UniformAllocator(Stateless):
    """n = `samples_per_prompt` samples for every prompt, no pre-samples."""

    def __init__(self, config: TrainConfig):
        self.samples_per_prompt = config.samples_per_prompt

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        return Allocation(np.full(len(prompts), self.samples_per_prompt))


# Fields of the `gvm` config section that `gvmrl.allocation.allocate` takes under the same names.
GVM_RULE_OPTIONS = (
    "alpha",
    "beta",
    "min_size",
    "max_size",
    "drop_above",
    "min_expected_accepts",
    "uniform_share",
)


@register_allocator("gvm")
class GVMAllocator(Stateless):
    """GVM (arXiv 2505.02391, Algorithm 1, stages 1-2): N' pre-samples per prompt, their accept
    rate p_i and accepted gradient norm G_i, and the budget spread by `gvmrl.allocation.allocate`
    with the options of the `gvm` config section."""

    def __init__(self, config: TrainConfig):
        self.options = config.gvm
        self.budget = config.gvm_budget

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        options = self.options
        with context.timer("presample"):
            presamples = context.sample(prompts, [options.presamples] * len(prompts))
        with context.timer("stats"):
            p, g = self.estimate_prompt_stats(presamples, len(prompts), context.grad_norms)
        sizes = self.sizes(p, g, len(prompts), context.log)
        return Allocation(
            sizes,
            presamples,
            train_on_presamples=options.reuse_presamples or options.budget_inclusive,
            metrics=allocation_metrics(sizes, p, g),
        )

    def estimate_prompt_stats(
        self, presamples: Rollouts, num_prompts: int, grad_norms: GradNorms
    ) -> tuple[np.ndarray, np.ndarray]:
        """Accept rate p_i (optionally Beta-smoothed) and mean gradient norm G_i of accepted
        pre-samples, for prompts 0..num_prompts-1."""
        options = self.options
        norms = np.full(len(presamples.samples), np.nan)
        measured = measured_subset(
            presamples.group, presamples.accepted, options.grad_norm_samples
        )
        if measured.size:
            norms[measured] = grad_norms(
                [presamples.samples[i] for i in measured],
                options.grad_params,
                options.grad_batch_size,
            )
        stats = prompt_stats(presamples.group, presamples.scores, norms)
        # Every prompt has N' >= 1 pre-samples, in prompt order, so stats align with the batch.
        assert stats.prompt_ids == list(range(num_prompts))
        a, b = options.accept_prior
        p = (stats.num_accepted + a) / (stats.num_samples + a + b)
        return p, stats.grad_norm

    def sizes(
        self, p: np.ndarray, g: np.ndarray, presampled_prompts: int, log: Callable[[str], None]
    ) -> np.ndarray:
        """n_i for the main samples: the whole budget, or what the pre-samples (N' for each of
        `presampled_prompts` prompts) left of it."""
        options = self.options
        budget = self.budget - (
            options.presamples * presampled_prompts if options.budget_inclusive else 0
        )
        with warnings.catch_warnings():  # an empty allocation is reported through `log`
            warnings.filterwarnings("ignore", message="allocate: every prompt has zero weight")
            rule_options = {name: getattr(options, name) for name in GVM_RULE_OPTIONS}
            sizes = allocate(p, g, budget, rule="gvm", **rule_options)
        if budget and not sizes.any():
            log(
                "no prompt qualified (no accepted pre-sample, or all filtered out): "
                "no samples allocated this iteration"
            )
        return sizes


def allocation_metrics(sizes: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, Any]:
    """How the budget was spread: share of prompts left out, largest n_i, entropy of n / N, and
    how G_i relates to p_i (strongly negatively on the built-in task: corr -0.56, BENCHMARKS.md)."""
    total = sizes.sum()
    share = sizes[sizes > 0] / max(total, 1)
    live = (p > 0) & (g > 0)
    corr = (
        float(np.corrcoef(p[live], g[live])[0, 1])
        if live.sum() > 2 and np.ptp(p[live]) > 0 and np.ptp(g[live]) > 0
        else float("nan")
    )
    return {
        "alloc_zero_share": float((sizes == 0).mean()),
        "alloc_max": int(sizes.max()) if sizes.size else 0,
        "alloc_entropy": float(-(share * np.log(share)).sum()) if share.size else 0.0,
        "alloc_budget": int(total),
        "accept_rate_mean": float(p.mean()),
        "grad_norm_mean": float(g[g > 0].mean()) if (g > 0).any() else 0.0,
        "corr_accept_rate_grad_norm": corr,
        "samples_per_prompt": sizes.tolist(),
    }


def measured_subset(group: np.ndarray, accepted: np.ndarray, per_prompt: int | None) -> np.ndarray:
    """Indices of the accepted samples whose gradient norm is computed: the first `per_prompt`
    accepted ones of each prompt (samples are i.i.d., so the first are as good as any), or all."""
    index = np.flatnonzero(accepted)
    if per_prompt is None:
        return index
    rank = np.zeros(index.size, dtype=np.int64)  # position among its prompt's accepted samples
    seen: dict[int, int] = {}
    for k, g in enumerate(group[index]):
        rank[k] = seen.get(int(g), 0)
        seen[int(g)] = rank[k] + 1
    return index[rank < per_prompt]


# The further rules register themselves on import; importing them last, once everything they
# build on is defined, keeps `ALLOCATORS` complete wherever this module is imported.
from gvmrl import adaptive_allocators  # noqa: E402, F401
