"""The further published allocation rules behind the `Allocator` interface: `gvm-history` and
`knapsack`, which carry per-prompt statistics across visits, and `dapo`, `greso` and
`reinforce-ada`, which sample in rounds within an iteration. Their math is in
gvmrl.allocation_rules; here they meet the trainer (sampling, rounds, history, metrics).

History rules. When training runs several epochs over a fixed prompt set, a prompt's earlier
visits already tell how often it is solved (and, for GVM, how large its accepted gradients are),
so these rules spend no generation on estimating it. They keep a `PromptHistory`, updated once
per visit with every sample of the visit (in `observe`, or after the rounds for GRESO), and
return it from `state_dict` so a resumed run allocates as the uninterrupted one would.

Round rules. They draw everything themselves through `context.sample(..., round=r)` (each round
its own seed, every sample counted as generated), choose what the M-step trains on among it
(`Allocation.training`, group ids 0..prompts_per_iteration-1) and leave the main sampling phase
empty. When a rule cannot fill its batch (every group dropped, every prompt skipped, the rounds
or the budget ran out) it reports `budget_shortfall` and a progress line, and the iteration
trains on what it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gvmrl.algorithms import GroupBaseline
from gvmrl.allocation_rules import dapo, greso, reinforce_ada
from gvmrl.allocation_rules.history import PromptHistory
from gvmrl.allocation_rules.knapsack import knapsack_sizes
from gvmrl.allocators import (
    Allocation,
    AllocationContext,
    GradNorms,
    GVMAllocator,
    Stateless,
    allocation_metrics,
    measured_subset,
    register_allocator,
)
from gvmrl.records import PromptRecord, Rollouts

if TYPE_CHECKING:
    from gvmrl.config import DAPOConfig, GVMConfig, TrainConfig


@dataclass
class VisitCounts:
    """Per prompt of a batch: what one visit (or part of it) drew, as `PromptHistory.update`
    takes it."""

    accepted: np.ndarray
    samples: np.ndarray
    grad_norm_sum: np.ndarray
    grad_norm_count: np.ndarray

    @staticmethod
    def zeros(num_prompts: int) -> VisitCounts:
        return VisitCounts(*(np.zeros(num_prompts) for _ in range(4)))

    @staticmethod
    def of(rollouts: Rollouts, num_prompts: int, norms: np.ndarray | None = None) -> VisitCounts:
        """Counts of `rollouts` (group ids in [0, num_prompts)); `norms` (N,) holds the
        gradient norms measured on some accepted samples, NaN elsewhere."""
        group = rollouts.group.astype(np.int64)
        measured = np.zeros(len(group), bool) if norms is None else ~np.isnan(norms)
        return VisitCounts(
            np.bincount(group, rollouts.accepted, minlength=num_prompts),
            np.bincount(group, minlength=num_prompts).astype(np.float64),
            np.bincount(group[measured], norms[measured], minlength=num_prompts)
            if norms is not None
            else np.zeros(num_prompts),
            np.bincount(group[measured], minlength=num_prompts).astype(np.float64),
        )

    def __add__(self, other: VisitCounts) -> VisitCounts:
        return VisitCounts(
            self.accepted + other.accepted,
            self.samples + other.samples,
            self.grad_norm_sum + other.grad_norm_sum,
            self.grad_norm_count + other.grad_norm_count,
        )

    def record(self, history: PromptHistory, prompts: list[PromptRecord]) -> None:
        history.update(
            [p.id for p in prompts],
            self.accepted,
            self.samples,
            self.grad_norm_sum,
            self.grad_norm_count,
        )


def measured_counts(
    rollouts: Rollouts, num_prompts: int, grad_norms: GradNorms, options: GVMConfig
) -> VisitCounts:
    """`VisitCounts` with the gradient norms of the first `gvm.grad_norm_samples` accepted
    samples of each prompt (all accepted ones if None), as GVM measures its pre-samples."""
    norms = np.full(len(rollouts.samples), np.nan)
    measured = measured_subset(rollouts.group, rollouts.accepted, options.grad_norm_samples)
    if measured.size:
        norms[measured] = grad_norms(
            [rollouts.samples[i] for i in measured], options.grad_params, options.grad_batch_size
        )
    return VisitCounts.of(rollouts, num_prompts, norms)


@register_allocator("gvm-history")
class GVMHistoryAllocator(GVMAllocator):
    """GVM's rule on statistics from each prompt's earlier visits: p_i Beta-smoothed
    and G_i the mean measured accepted gradient norm, exponentially averaged across visits.
    A prompt never seen gets `gvm.presamples` pre-samples (counted as generated; trained on with
    gvm.reuse_presamples or gvm.budget_inclusive, which also takes them out of the budget) or,
    with gvm_history.unseen: prior, p = unseen_accept_rate and the batch's median G.

    The budget is GVM's (gvm.budget; by default N' x prompts, or with gvm.budget_inclusive
    samples_per_prompt x prompts, which then holds the pre-samples of unseen prompts). After
    grading, every sample of the visit (pre-samples and main samples) updates the history; the
    gradient norms of its accepted samples are measured then (the rule's own cost: time_history).
    """

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        rule = config.gvm_history
        self.unseen = rule.unseen
        self.history = PromptHistory(rule.decay, rule.accept_prior, rule.unseen_accept_rate)
        self._presampled = VisitCounts.zeros(0)  # this iteration's pre-sample counts, per prompt

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        options = self.options
        with context.timer("stats"):
            p, g, seen = self.history.estimates([r.id for r in prompts])
        unseen = np.flatnonzero(~seen) if self.unseen == "presample" else np.zeros(0, np.int64)
        presamples, self._presampled = None, VisitCounts.zeros(len(prompts))
        if unseen.size:
            with context.timer("presample"):
                presamples = context.sample(
                    [prompts[i] for i in unseen], [options.presamples] * unseen.size
                )
            presamples.group = unseen[presamples.group]  # batch positions, as the main samples
            with context.timer("stats"):
                self._presampled = measured_counts(
                    presamples, len(prompts), context.grad_norms, options
                )
            a, b = self.history.accept_prior
            counts = self._presampled
            p[unseen] = (counts.accepted[unseen] + a) / (counts.samples[unseen] + a + b)
            measured = counts.grad_norm_count[unseen] > 0
            has_norm, no_norm = unseen[measured], unseen[~measured]
            g[has_norm] = counts.grad_norm_sum[has_norm] / counts.grad_norm_count[has_norm]
            # no accepted pre-sample: the median G of the batch, as the history gives unknowns
            known = np.concatenate([g[seen], g[has_norm]])
            g[no_norm] = float(np.median(known)) if known.size else 1.0
        sizes = self.sizes(p, g, unseen.size, context.log)
        metrics = allocation_metrics(sizes, p, g)
        metrics["history_seen_share"] = float(seen.mean()) if seen.size else 0.0
        return Allocation(
            sizes,
            presamples,
            train_on_presamples=options.reuse_presamples or options.budget_inclusive,
            metrics=metrics,
        )

    def observe(
        self, prompts: list[PromptRecord], rollouts: Rollouts, context: AllocationContext
    ) -> None:
        with context.timer("history"):
            main = measured_counts(rollouts, len(prompts), context.grad_norms, self.options)
            (self._presampled + main).record(self.history, prompts)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.history.load_state_dict(state["history"])


@register_allocator("knapsack")
class KnapsackAllocator:
    """Knapsack-RL (arXiv 2509.25849): samples_per_prompt x prompts spread by the value of n
    samples at each prompt's success rate from its earlier visits (`knapsack_sizes`); a prompt
    with fewer than knapsack.min_history_samples samples seen gets samples_per_prompt."""

    def __init__(self, config: TrainConfig):
        self.options = config.knapsack
        self.samples_per_prompt = config.samples_per_prompt
        self.budget = config.samples_per_prompt * config.prompts_per_iteration
        self.history = PromptHistory(self.options.decay, accept_prior=(0.0, 0.0))

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        o = self.options
        ids = [r.id for r in prompts]
        with context.timer("stats"):
            p, _, _ = self.history.estimates(ids)
            known = self.history.samples_seen(ids) >= o.min_history_samples
            result = knapsack_sizes(
                p,
                known,
                self.budget,
                default_size=self.samples_per_prompt,
                min_size=o.min_size,
                max_size=o.max_size,
                zero_size=o.zero_size,
                one_size=o.one_size,
                confidence=o.confidence,
                cost_estimate=o.cost_estimate,
                redistribute_excess=o.redistribute_excess,
            )
        metrics = allocation_metrics(result.sizes, p, np.zeros_like(p))
        for unused in ("grad_norm_mean", "corr_accept_rate_grad_norm"):  # knapsack has no G
            del metrics[unused]
        metrics["accept_rate_mean"] = float(p[known].mean()) if known.any() else float("nan")
        metrics.update(
            known_share=float(known.mean()),
            knapsack_share=float(result.effective.mean()),
            excess_redistributed=result.excess_redistributed,
            effective_ratio=result.effective_ratio,
        )
        return Allocation(result.sizes, metrics=metrics)

    def observe(
        self, prompts: list[PromptRecord], rollouts: Rollouts, context: AllocationContext
    ) -> None:
        VisitCounts.of(rollouts, len(prompts)).record(self.history, prompts)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.history.load_state_dict(state["history"])


# Keeps GRESO's skip draws apart from every other seeded stream of the run.
GRESO_STREAM = 0x67E50


@dataclass
class Rounds:
    """What one iteration of DAPO's dynamic sampling drew."""

    prompts: list[PromptRecord]
    """Every prompt sampled, in draw order."""
    rollouts: Rollouts
    """All its samples; group = index into `prompts`."""
    informative: np.ndarray
    """(len(prompts),) bool: groups whose rewards are not all equal."""
    rounds: int
    skipped: int
    """Prompts drawn but not sampled (`select` said no)."""


def empty_rollouts() -> Rollouts:
    return Rollouts([], np.zeros(0), np.zeros(0, dtype=np.int64))


def dynamic_sampling(
    batch: list[PromptRecord],
    context: AllocationContext,
    options: DAPOConfig,
    samples_per_prompt: int,
    select: Callable[[list[PromptRecord]], np.ndarray] | None = None,
) -> Rounds:
    """Rounds of prompts with n samples each until len(batch) informative groups are in or the
    rounds run out: the batch plus further prompts in round 0, further prompts after (none
    drawn twice in an iteration). `select` (GRESO) says which of a round's prompts to sample."""
    target = len(batch)
    round_size = options.gen_prompts or 3 * target
    drawn_ids = {r.id for r in batch}

    def further(count: int, round: int) -> list[PromptRecord]:
        if context.more_prompts is None:
            raise ValueError("dynamic sampling needs further prompts: context.more_prompts")
        return context.more_prompts(count, round, drawn_ids)

    prompts: list[PromptRecord] = []
    parts: list[Rollouts] = []
    informative: list[np.ndarray] = []
    kept, rounds, skipped, share = 0, 0, 0, None
    while rounds < options.max_rounds:
        if rounds == 0:
            candidates = list(batch)
            if round_size > target:
                candidates += further(round_size - target, 0)
        else:
            size = dapo.prompts_for_next_round(
                target - kept,
                share,
                samples_per_prompt,
                gen_batch_size=round_size,
                adaptive=options.adaptive_rounds,
                headroom=options.headroom,
                min_prompts=options.min_round_prompts,
            )
            candidates = further(size, rounds)
        if not candidates:
            break  # every training prompt was drawn this iteration
        drawn_ids.update(r.id for r in candidates)
        chosen = candidates if select is None else [
            r for r, keep in zip(candidates, select(candidates)) if keep
        ]
        skipped += len(candidates) - len(chosen)
        share = None
        if chosen:
            drawn = context.sample(chosen, [samples_per_prompt] * len(chosen), round=rounds)
            useful = dapo.informative_groups(drawn.scores, drawn.group, len(chosen))
            drawn.group = drawn.group + len(prompts)
            prompts += chosen
            parts.append(drawn)
            informative.append(useful)
            kept += int(useful.sum())
            share = float(useful.mean())
        rounds += 1
        if dapo.should_stop(kept, target, rounds, options.max_rounds):
            break
    rollouts = empty_rollouts()
    for part in parts:
        rollouts = Rollouts.concat(rollouts, part)
    flags = np.concatenate(informative) if informative else np.zeros(0, bool)
    return Rounds(prompts, rollouts, flags, rounds, skipped)


def train_on_first_informative(
    drawn: Rounds, target: int, name: str, context: AllocationContext
) -> Allocation:
    """The allocation of a dynamic-sampling iteration: train on the first `target` informative
    groups (relabelled 0..K-1), report what fell short."""
    keep = dapo.trim_to_target(drawn.informative, target)
    label = np.full(len(drawn.prompts), -1, dtype=np.int64)
    label[keep] = np.arange(keep.size)
    rows = label[drawn.rollouts.group] >= 0 if drawn.prompts else np.zeros(0, bool)
    training = drawn.rollouts.select(rows)
    training.group = label[training.group]
    shortfall = target - int(keep.size)
    if shortfall:
        context.log(
            f"{name}: {keep.size} of {target} informative groups after {drawn.rounds} rounds "
            f"({len(drawn.prompts)} prompts sampled, {drawn.skipped} skipped); training on those"
        )
    sampled = len(drawn.prompts)
    metrics = {
        "rounds": drawn.rounds,
        "prompts_sampled": sampled,
        "prompts_skipped": drawn.skipped,
        "informative_groups": int(drawn.informative.sum()),
        "budget_shortfall": shortfall,
        "zero_variance_share": float(1 - drawn.informative.mean()) if sampled else 0.0,
        "discarded_samples": len(drawn.rollouts.samples) - len(training.samples),
    }
    return Allocation(
        np.zeros(target, dtype=np.int64), drawn.rollouts, training=training, metrics=metrics
    )


@register_allocator("dapo")
class DAPOAllocator(Stateless):
    """DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2): rounds of dapo.gen_prompts prompts
    with samples_per_prompt samples each, groups whose rewards are all equal dropped, until
    prompts_per_iteration informative groups are in (or dapo.max_rounds); the first
    prompts_per_iteration of them are trained on, the rest generated and discarded, as in verl.
    """

    name = "dapo"

    def __init__(self, config: TrainConfig):
        self.options = config.dapo
        self.samples_per_prompt = config.samples_per_prompt

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        with context.timer("presample"):
            drawn = dynamic_sampling(prompts, context, self.options, self.samples_per_prompt)
        return train_on_first_informative(drawn, len(prompts), self.name, context)


@register_allocator("greso")
class GRESOAllocator(DAPOAllocator):
    """GRESO (arXiv 2506.02177, Alg. 1): before each of DAPO's rounds, skip each prompt with
    probability 1 - max(base^streak, greso.min_keep), streak = its latest consecutive visits with
    all samples right (base p_easy) or all wrong (base p_hard); after the first epoch the bases
    move by greso.step per iteration towards a zero-variance share of greso.target_zero_variance.
    Every sampled group updates the history; skipped prompts leave it unchanged."""

    name = "greso"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.greso = config.greso
        self.history = PromptHistory()
        self.p_easy = self.p_hard = config.greso.initial_base
        self.prompts_trained = 0  # batch prompts of the iterations so far (epochs)
        self.rng = np.random.default_rng(np.random.SeedSequence([config.seed, GRESO_STREAM]))

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        o = self.greso
        with context.timer("presample"):
            drawn = dynamic_sampling(
                prompts, context, self.options, self.samples_per_prompt, self.keep
            )
        with context.timer("stats"):
            visit = VisitCounts.of(drawn.rollouts, len(drawn.prompts))
            visit.record(self.history, drawn.prompts)
            epoch = o.adapt_after_prompts
            if self.prompts_trained >= (context.train_set_size if epoch is None else epoch):
                easy, hard = greso.zero_variance_shares(visit.accepted, visit.samples)
                easy_target, hard_target = greso.easy_and_hard_targets(o.target_zero_variance)
                self.p_easy = greso.adapt_exploration_base(
                    self.p_easy, easy, easy_target, o.step, *o.base_range
                )
                self.p_hard = greso.adapt_exploration_base(
                    self.p_hard, hard, hard_target, o.step, *o.base_range
                )
            self.prompts_trained += len(prompts)
        allocation = train_on_first_informative(drawn, len(prompts), self.name, context)
        allocation.metrics.update(greso_p_easy=self.p_easy, greso_p_hard=self.p_hard)
        return allocation

    def keep(self, candidates: list[PromptRecord]) -> np.ndarray:
        """(len(candidates),) bool: the prompts GRESO samples (one draw of `rng` each)."""
        easy, hard = self.history.zero_variance_streaks([r.id for r in candidates])
        skip = greso.skip_probability(easy, hard, self.p_easy, self.p_hard, self.greso.min_keep)
        return ~greso.decide_skips(skip, self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "p_easy": self.p_easy,
            "p_hard": self.p_hard,
            "prompts_trained": self.prompts_trained,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.history.load_state_dict(state["history"])
        self.p_easy, self.p_hard = state["p_easy"], state["p_hard"]
        self.prompts_trained = state["prompts_trained"]
        self.rng.bit_generator.state = state["rng"]


@register_allocator("reinforce-ada")
class ReinforceAdaAllocator(Stateless):
    """Reinforce-Ada (arXiv 2510.04996): rounds of reinforce_ada.round_samples samples for every
    prompt still active, a prompt retired once its samples meet the exit rule, at most
    reinforce_ada.max_rounds rounds (and reinforce_ada.budget samples); each prompt trains on a
    group of K = group_size samples (balanced between right and wrong), with advantages against
    its mean (and std) over every sample drawn when global_baseline is on."""

    def __init__(self, config: TrainConfig):
        self.options = config.reinforce_ada
        self.group_size = self.options.group_size or config.samples_per_prompt

    def allocate(self, prompts: list[PromptRecord], context: AllocationContext) -> Allocation:
        o, size = self.options, self.group_size
        count = len(prompts)
        positives = np.zeros(count, dtype=np.int64)
        negatives = np.zeros(count, dtype=np.int64)
        active = np.ones(count, dtype=bool)
        remaining = o.budget
        drawn, rounds = empty_rollouts(), 0
        with context.timer("presample"):
            while rounds < o.max_rounds:
                sizes = reinforce_ada.round_sizes(active, o.round_samples, remaining)
                if not sizes.any():
                    break
                part = context.sample(prompts, sizes, round=rounds)
                drawn = Rollouts.concat(drawn, part)
                positive = part.scores > o.positive_threshold
                positives += np.bincount(part.group, positive, count).astype(np.int64)
                negatives += np.bincount(part.group, ~positive, count).astype(np.int64)
                remaining = None if remaining is None else remaining - int(sizes.sum())
                rounds += 1
                active = reinforce_ada.still_active(positives, negatives, size, o.exit_rule)
                if not active.any():
                    break
        with context.timer("stats"):
            chosen = np.zeros(len(drawn.samples), dtype=bool)
            for i in range(count):
                rows = np.flatnonzero(drawn.group == i)
                pick = reinforce_ada.select_group(
                    drawn.scores[rows] > o.positive_threshold, size, not active[i], o.exit_rule
                )
                chosen[rows[pick]] = True
            training = drawn.select(chosen)
            baseline = (
                GroupBaseline(*reinforce_ada.global_baseline(positives, negatives))
                if o.global_baseline
                else None
            )
        shortfall = size * count - len(training.samples)
        if shortfall:
            context.log(
                f"reinforce-ada: {len(training.samples)} of {size * count} group samples after "
                f"{rounds} rounds ({int(active.sum())} prompts never met the exit rule)"
            )
        totals = positives + negatives
        metrics = {
            "rounds": rounds,
            "unfinished_share": float(active.mean()),
            "budget_shortfall": shortfall,
            "zero_variance_share": float(np.mean((positives == 0) | (negatives == 0)))
            if count
            else 0.0,
            "discarded_samples": len(drawn.samples) - len(training.samples),
            "alloc_max": int(totals.max()) if count else 0,
            "samples_per_prompt": totals.tolist(),
        }
        return Allocation(
            np.zeros(count, dtype=np.int64),
            drawn,
            training=training,
            baseline=baseline,
            metrics=metrics,
        )
