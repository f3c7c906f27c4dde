"""The GVM-EM training loop (arXiv 2505.02391, Algorithm 1), resumable.

Each iteration:
  a. take the next chunk of prompts;
  b. the allocation rule (`gvmrl.allocators`) gives each prompt its number of samples n_i; GVM
     draws N' pre-samples per prompt, estimates each prompt's accept rate p_i and gradient norm
     G_i and spreads the budget N by `gvmrl.allocation`; uniform gives every prompt n;
  c. draw n_i samples per prompt from the current policy and grade them;
  d. M-step: the configured algorithm (`gvmrl.algorithms`: RAFT, RAFT++ or GRPO) over
     mini-batches, AdamW;
  e. log, evaluate every k iterations, checkpoint.

`Trainer.iteration` is that list, one named step per line; the steps are methods below it. What
the loop needs is built first, by the functions of `gvmrl.run_setup`.

Every forward pass of the training model (HF rollouts, pi_old, update, gradient norms, eval) runs
under the run's `gvmrl.precision` autocast, and every pass over an iteration's samples (update,
pi_old, reference, gradient norms) is cut into micro-batches by `update.micro_batch_size` or
`update.max_tokens_per_micro_batch`. Each optimizer step passes `gvmrl.guards.NonFiniteGuard`
first: a step with a NaN/inf loss or gradient norm is skipped and counted, never applied.

Under torchrun (`gvmrl.run_setup.join_job`) every rank runs this same loop on the same prompts
and allocation-rule state: the policy is sharded with FSDP2 and a full replica per rank samples;
sampling, gradient norms, the update's rows and evaluation are dealt over the ranks and gathered
back, so every rank sees what one process sees (docs/DISTRIBUTED.md). A plain run has no process
group and takes none of those paths.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gvmrl.algorithms import ALGORITHMS, GroupBaseline
from gvmrl.allocators import AllocationContext, make_allocator
from gvmrl.batching import (
    SequenceBatch,
    pack_sequences,
    plan_micro_batches,
    sweep_logprobs,
)
from gvmrl.checkpoint import save_checkpoint
from gvmrl.config import TrainConfig
from gvmrl.data import format_prompt
from gvmrl.distributed.checkpoint import save_final, save_sharded_checkpoint
from gvmrl.distributed.context import shutdown
from gvmrl.distributed.dealing import deal_samples, request_counts, sample_seeds, split_prompts
from gvmrl.distributed.reduction import (
    gather_rows,
    pad_to_common_count,
    padding_batch,
    sum_over_ranks,
)
from gvmrl.distributed.sharding import policy_logprobs, sync_replica
from gvmrl.estimation import per_sample_grad_norms
from gvmrl.evaluation import evaluate, summarise_correct
from gvmrl.guards import NonFiniteGuard
from gvmrl.io import atomic_directory
from gvmrl.losses import aggregate, kl_penalty, token_weights, truncated_importance_weights
from gvmrl.memory import plan_fits
from gvmrl.precision import resolve_precision
from gvmrl.progress import Progress
from gvmrl.prompt_length import context_length
from gvmrl.records import PromptRecord, Rollouts
from gvmrl.rewards import REWARDS
from gvmrl.rollout import Sample, SamplingParams
from gvmrl.run_setup import (
    PHASE_EVAL,
    PHASE_PRESAMPLE,
    PHASE_SAMPLE,
    PHASE_UPDATE,
    build_engine,
    build_optimizer,
    configure_torch,
    derive_seed,
    find_checkpoint,
    join_job,
    load_data,
    load_policy,
    load_sharded_policy,
    open_metrics_logger,
    restore_state,
    save_run_config,
)
from gvmrl.runtime import instruction_for
from gvmrl.timing import IterationMetrics
from gvmrl.verify import Grader


class Trainer:
    """Holds the run's state (policy, optimizer, engine, data) and runs Algorithm 1."""

    def __init__(self, config: TrainConfig, output_dir: str | Path):
        self.config = config.validate()
        self.output_dir = Path(output_dir)
        plan_fits(config)  # a config that cannot fit the GPU stops before anything loads
        self.context = join_job(config)  # one process, or this rank of a torchrun job
        checkpoint = find_checkpoint(config, self.output_dir, self.context)
        configure_torch(config)
        self.device = self.context.device
        self.precision = resolve_precision(config.dtype, config.compute_dtype, self.device)
        if self.context.grouped:
            self.model, self.tokenizer, self.reference, self.replica = load_sharded_policy(
                config, self.context, self.precision
            )
        else:
            self.model, self.tokenizer, self.reference = load_policy(
                config, checkpoint, self.device, self.precision
            )
            self.replica = self.model  # one process samples from the policy itself
        self.instruction = instruction_for(self.replica, config.data.instruction)
        data = load_data(config, self.tokenizer, self.instruction, context_length(self.replica))
        self.stream, self.eval_records = data.stream, data.eval_records
        # only now: bad prompts leave nothing behind
        save_run_config(config, self.output_dir, self.context)
        self.engine, self.rollout_context = build_engine(
            config, self.replica, self.tokenizer, self.precision
        )
        self.grader = Grader(workers=config.verifier_workers, timeout=config.verifier_timeout)
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.algorithm = ALGORITHMS[config.algorithm]
        self.allocator = make_allocator(config)
        self.state = restore_state(
            checkpoint,
            self.optimizer,
            self.scheduler,
            self.allocator,
            sharded=(self.model, self.context) if self.context.grouped else None,
        )
        self.guard = NonFiniteGuard(
            config.optim.max_skipped_steps,
            skipped=self.state["skipped_steps"],
            in_a_row=self.state["skipped_steps_in_a_row"],
        )
        self.metrics = open_metrics_logger(
            config,
            self.output_dir,
            self.state["iteration"] if checkpoint is not None else None,
            self.context,
        )
        self.progress = (
            Progress(enabled=config.logging.progress)
            if self.context.is_main
            else Progress(enabled=False, stream=open(os.devnull, "w"))  # rank 0 alone reports
        )
        for note in data.notes:
            self.progress.log(note)

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> dict[str, Any]:
        """Train from the last finished iteration to `config.iterations`; returns the last
        metrics."""
        last: dict[str, Any] = {}
        # A rerun of a finished run trains nothing; its saved final weights stay as they are.
        trains = self.state["iteration"] < self.config.iterations
        with self.progress, self.grader:
            if self.state["iteration"] == 0 and self._eval_due(0):
                last = {"iteration": 0, **self._counters(), **self.evaluate()}
                self._finish_iteration(last)
            for iteration in range(self.state["iteration"] + 1, self.config.iterations + 1):
                started = time.perf_counter()
                last = self.iteration(iteration)
                self.state["wall_time"] += time.perf_counter() - started
                last["wall_time"] = self.state["wall_time"]
                self._finish_iteration(last)
            if self.config.save_final and (trains or not (self.output_dir / "final").exists()):
                self._save_final()
        self.metrics.close()
        return last

    def iteration(self, iteration: int) -> dict[str, Any]:
        """One EM iteration of GVM-EM (Algorithm 1)."""
        m = IterationMetrics()
        timer = m.timed
        prompts = self.stream.batch(iteration)  # a.
        context = self._allocation_context(iteration, timer)
        allocation = self.allocator.allocate(prompts, context)  # b.
        m.add(allocation.metrics)
        with timer("sample"):  # c.
            rollouts = self.sample(prompts, allocation.sizes, iteration, PHASE_SAMPLE)
        self.allocator.observe(prompts, rollouts, context)  # the rule's history, if it keeps one
        with timer("update"):  # d.
            update = self.update(
                allocation.training_rollouts(rollouts), iteration, allocation.baseline
            )
        m.add(update)
        m.add(self._generation_metrics(allocation.presamples, rollouts))  # e.
        if self._eval_due(iteration):
            with timer("eval"):
                held_out = self.evaluate()
            m.add(held_out)
        return {"iteration": iteration, **self._counters(), **m.values}

    # ------------------------------------------------------------------------------------------
    # Steps

    def sample(
        self,
        prompts: list[PromptRecord],
        sizes: Sequence[int],
        iteration: int,
        phase: int,
        round: int = 0,
    ) -> Rollouts:
        """Draw sizes[i] responses to prompt i from the current policy and grade them. Round 0 of
        a phase keeps the phase's own seed; later rounds (multi-round allocation rules) add the
        round number to it."""
        cfg = self.config
        params = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=derive_seed(cfg.seed, iteration, phase, *([round] if round else [])),
        )
        self._sync_engine()
        texts = [format_prompt(self.tokenizer, r.problem, self.instruction) for r in prompts]
        sizes = [int(n) for n in sizes]
        if self.context.grouped:
            samples, scores = self._sample_share(prompts, texts, sizes, params)
        else:
            with self.rollout_context():
                samples = self.engine.generate(texts, sizes, params)
            scores = self._grade(prompts, samples)
        group = np.array([s.prompt_index for s in samples], dtype=np.int64)
        self.state["samples_generated"] += len(samples)
        self.state["tokens_generated"] += sum(len(s.response_ids) for s in samples)
        return Rollouts(samples, scores, group)

    def update(
        self, rollouts: Rollouts, iteration: int, baseline: GroupBaseline | None = None
    ) -> dict[str, float]:
        """M-step: advantages (against the allocation rule's per-prompt `baseline` if it has
        one), pi_old (and the reference's log-probs), then epochs of mini-batch
        AdamW steps on the algorithm's loss; steps the non-finite guard refuses are skipped and
        counted (`optimizer_steps` counts the applied ones)."""
        cfg = self.config
        rollouts = rollouts.select(self.algorithm.trains_on(rollouts.scores))
        metrics = {"trained_samples": len(rollouts.samples), "optimizer_steps": 0}
        metrics["skipped_steps"] = 0
        if not rollouts.samples:
            return metrics  # nothing to train on: skip the step rather than take an empty one
        group = torch.as_tensor(rollouts.group)
        advantages = self.algorithm.advantages(
            torch.as_tensor(rollouts.scores), group, cfg.loss, baseline
        )
        # GRPO: samples in groups whose rewards are all equal carry no policy gradient
        metrics["zero_advantage_share"] = float((advantages == 0).float().mean())
        batch = self._pack(rollouts.samples)
        rng = np.random.default_rng(derive_seed(cfg.seed, iteration, PHASE_UPDATE))
        epochs = [
            minibatch_rows(
                rollouts.group,
                by=cfg.update.minibatch_by,
                size=cfg.update.minibatch_size,
                num_prompts=cfg.prompts_per_iteration,
                rng=rng,
            )
            for _ in range(cfg.update.epochs)
        ]
        # the rows this rank trains on (all of them in one process) need pi_old and the reference
        needed = np.unique(
            np.concatenate([self._local_rows(batch, rows) for e in epochs for rows in e])
        )
        old_logprobs, tis_weights, gap = self._old_logprobs(rollouts.samples, batch, needed)
        metrics.update(gap)
        reference = (
            None if self.reference is None else self._logprobs(self.reference, batch, needed)
        )
        sums: dict[str, float] = {}
        self.model.train()
        for minibatches in epochs:
            for rows in minibatches:
                step = self._optimizer_step(
                    batch.select(rows),
                    old_logprobs[rows],
                    advantages[rows],
                    group[rows],
                    reference=None if reference is None else reference[rows],
                    tis_weights=None if tis_weights is None else tis_weights[rows],
                )
                if step is None:
                    metrics["skipped_steps"] += 1
                    continue
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
                metrics["optimizer_steps"] += 1
        self.state["optimizer_steps"] += metrics["optimizer_steps"]
        metrics.update({k: v / max(metrics["optimizer_steps"], 1) for k, v in sums.items()})
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Accuracy on the held-out prompts, with a fixed seed so evaluations share randomness."""
        if not self.eval_records:
            return {}
        cfg = self.config
        params = SamplingParams(
            temperature=cfg.eval.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=derive_seed(cfg.seed, PHASE_EVAL),
        )
        self._sync_engine()
        # in a job, rank r evaluates the r-th contiguous slice and the per-prompt counts are
        # gathered; each sample's seed comes from its global record index either way
        records, rank, world = self.eval_records, self.context.rank, self.context.world_size
        lo, hi = len(records) * rank // world, len(records) * (rank + 1) // world
        correct: list[int] = []
        if hi > lo:
            with self.rollout_context():
                result = evaluate(
                    self.engine,
                    self.tokenizer,
                    records[lo:hi],
                    samples=cfg.eval.samples,
                    params=params,
                    grader=self.grader,
                    instruction=self.instruction,
                    first_record_index=lo,
                )
            correct = [round(sum(row["scores"])) for row in result.rows]
        if self.context.grouped:
            everything = gather_rows(
                np.arange(lo, hi), np.reshape(correct, (-1, 1)), len(records), self.context
            )
            correct = [round(c) for c in everything[:, 0]]
        accuracy, pass_at = summarise_correct(correct, cfg.eval.samples)
        return {
            "eval_accuracy": accuracy,
            **{f"eval_pass@{k}": v for k, v in pass_at.items()},
        }

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _allocation_context(self, iteration: int, timer) -> AllocationContext:
        def sample(prompts: list[PromptRecord], sizes: Sequence[int], round: int = 0) -> Rollouts:
            return self.sample(prompts, sizes, iteration, PHASE_PRESAMPLE, round)

        def grad_norms(samples: list[Sample], params: str, micro_batch_size: int) -> np.ndarray:
            if not self.context.grouped:
                return self._grad_norms(samples, params, micro_batch_size)
            # a job: this rank's share of the samples, dealt by tokens, on its full replica
            tokens = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
            mine = split_prompts(tokens, self.context.world_size)[self.context.rank]
            norms = self._grad_norms([samples[j] for j in mine], params, micro_batch_size)
            table = gather_rows(mine, norms.reshape(-1, 1), len(samples), self.context)
            return table[:, 0].astype(np.float32)  # float32 norms, exactly as one process's

        def more_prompts(count: int, round: int, exclude: set[str]) -> list[PromptRecord]:
            return self.stream.extra(iteration, round, count, exclude)

        return AllocationContext(
            sample,
            grad_norms,
            timer,
            self.progress.log,
            more_prompts=more_prompts,
            train_set_size=len(self.stream.records),
        )

    def _sync_engine(self) -> None:
        """Before sampling: in a job the replica takes the sharded policy's weights first."""
        if self.context.grouped:
            sync_replica(self.model, self.replica)
        self.engine.sync_weights(self.replica)

    def _grade(self, prompts: list[PromptRecord], samples: list[Sample]) -> np.ndarray:
        """The training reward of each sample (float64)."""
        grades = self.grader.grade_many(
            [s.text for s in samples], [prompts[s.prompt_index].answer for s in samples]
        )
        reward = REWARDS[self.config.reward]
        return np.array([reward(gr, s.text) for gr, s in zip(grades, samples)], dtype=np.float64)

    def _sample_share(
        self,
        prompts: list[PromptRecord],
        texts: list[str],
        sizes: list[int],
        params: SamplingParams,
    ) -> tuple[list[Sample], np.ndarray]:
        """A job's sampling: this rank draws and grades its share of the samples (i, k), dealt by
        expected tokens, each from the seed `sample_seeds(params.seed, i, k)` one process gives it;
        every rank gets all samples and scores back in (prompt, k) order."""
        expected = [
            len(ids) + self.config.rollout.max_new_tokens
            for ids in self.tokenizer(texts).input_ids
        ]
        share = deal_samples(sizes, expected, self.context.world_size)[self.context.rank]
        samples: list[Sample] = []
        if len(share):
            indices, counts = request_counts(share)
            seeds = sample_seeds(params.seed, share[:, 0], share[:, 1]).tolist()
            with self.rollout_context():
                samples = self.engine.generate(
                    [texts[i] for i in indices], counts.tolist(), params, seeds=seeds
                )
            for s in samples:
                s.prompt_index = int(indices[s.prompt_index])
        pieces: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(pieces, (share, samples, self._grade(prompts, samples)))
        pairs = np.concatenate([piece[0] for piece in pieces])
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        everything = [s for piece in pieces for s in piece[1]]
        scores = np.concatenate([piece[2] for piece in pieces])
        return [everything[j] for j in order], scores[order]

    def _grad_norms(self, samples: list[Sample], params: str, micro_batch_size: int) -> np.ndarray:
        """Per-sample gradient norms (float32) on the full-weight policy (the replica in a job)."""
        if not samples:
            return np.zeros(0, dtype=np.float32)
        batch = self._pack(samples)
        with self.precision.autocast():
            norms = per_sample_grad_norms(
                self.replica,
                batch.input_ids,
                batch.attention_mask,
                batch.response_mask,
                params=params,
                micro_batch_size=micro_batch_size,
                max_tokens_per_micro_batch=self.config.update.max_tokens_per_micro_batch,
            )
        return norms.float().cpu().numpy()

    def _local_rows(self, batch: SequenceBatch, rows: np.ndarray) -> np.ndarray:
        """The rows of mini-batch `rows` this rank trains on: all of them in one process, in a job
        its share dealt by tokens."""
        if not self.context.grouped:
            return rows
        tokens = batch.attention_mask[rows].sum(dim=1).cpu().numpy()
        return rows[split_prompts(tokens, self.context.world_size)[self.context.rank]]

    def _pack(self, samples: list[Sample]) -> SequenceBatch:
        return pack_sequences(
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            self.tokenizer.pad_token_id,
        ).to(self.device)

    def _old_logprobs(
        self, samples: list[Sample], batch: SequenceBatch, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """pi_old of each response token on the (N, T) grid of `batch`, the truncated importance
        weights when `loss.tis_cap` is set, and, when recomputed, `rollout_logprob_gap`.

        recompute (default): a no-grad pass of the training model before the first step, as TRL
        and verl do, so the PPO ratio starts at 1 in the update's own kernels and precision;
        rollout: the sampler's log-probs (equal up to round-off for the HF engine, which samples
        from the very weights being trained; vLLM's kernels and bf16 weights differ slightly).
        Recomputed for `rows` only (others stay 0), on the replica in a job (it holds the policy's
        current weights: it was synced before this iteration's sampling).

        rollout_logprob_gap: mean |log pi_old - log pi_rollout| over the recomputed response
        tokens of every rank, the size of the sampler/trainer mismatch that `tis_cap` corrects."""
        loss = self.config.loss
        sampler = self._rollout_logprobs(samples, batch)
        if loss.old_logprobs == "rollout":
            return sampler, None, {}
        old = self._logprobs(self.replica, batch, rows)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        mask = batch.response_mask[index].bool()
        gap_sum = float((old[index] - sampler[index]).abs()[mask].sum())
        tokens = float(mask.sum())
        if self.context.grouped:
            gap_sum, tokens = sum_over_ranks([gap_sum, tokens], self.context)
        gap = {"rollout_logprob_gap": gap_sum / max(tokens, 1.0)}
        if loss.tis_cap is None:
            return old, None, gap
        weights = truncated_importance_weights(old, sampler, batch.response_mask, loss.tis_cap)
        return old, weights, gap

    def _rollout_logprobs(self, samples: list[Sample], batch: SequenceBatch) -> torch.Tensor:
        """The sampling engine's log-prob of each response token, on the (N, T) grid of `batch`."""
        old = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for j, s in enumerate(samples):
            start = len(s.prompt_ids)
            old[j, start : start + len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        return old.to(self.device)

    def _logprobs(
        self, model: torch.nn.Module, batch: SequenceBatch, rows: np.ndarray | None = None
    ) -> torch.Tensor:
        """(N, T) no-grad log-probs of `batch` under `model` in eval mode (no dropout), in the
        update's micro-batches and precision: pi_old (recompute) and the KL reference. Only of
        `rows` when given (a rank's share; the others stay 0)."""
        if rows is not None and len(rows) < len(batch):
            out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
            if len(rows):
                out[torch.as_tensor(rows, device=self.device)] = self._logprobs(
                    model, batch.select(rows)
                )
            return out
        cfg = self.config
        training = model.training
        model.eval()
        try:
            with self.precision.autocast():
                return sweep_logprobs(
                    model,
                    batch,
                    size=cfg.update.micro_batch_size,
                    max_tokens=cfg.update.max_tokens_per_micro_batch,
                    temperature=cfg.rollout.temperature,
                )
        finally:
            model.train(training)

    def _optimizer_step(
        self,
        batch: SequenceBatch,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        group: torch.Tensor,
        *,
        reference: torch.Tensor | None = None,
        tis_weights: torch.Tensor | None = None,
    ) -> dict[str, float] | None:
        """One optimizer step on a mini-batch, accumulated over micro-batches; None when the
        non-finite guard skipped it. The token weights are computed over the whole mini-batch, so
        the accumulated gradient equals the full-batch one. `reference`: the KL reference's
        log-probs; `tis_weights`: per-token truncated IS weights of the policy loss."""
        cfg = self.config
        weights = token_weights(batch.response_mask, cfg.loss.aggregation, group).to(self.device)
        advantages = advantages.to(self.device)  # token-budget micro-batches index on the device
        totals = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "kl": 0.0, "entropy": 0.0}
        logprobs = policy_logprobs(self.model)  # through FSDP's hooks in a job
        for piece in self._micro_batches(
            batch, weights, old_logprobs, advantages, reference, tis_weights
        ):
            mb, w = piece.batch, piece.weights
            with self.precision.autocast():
                logp, entropy = logprobs(mb, temperature=cfg.rollout.temperature, with_entropy=True)
            per_token, stats = self.algorithm.per_token_loss(
                logp, piece.old_logprobs, piece.advantages, mb.response_mask, cfg.loss
            )
            if piece.tis_weights is not None:
                per_token = per_token * piece.tis_weights
            if piece.reference is not None:
                kl = kl_penalty(logp, piece.reference, cfg.loss.kl_kind)
                per_token = per_token + cfg.loss.kl_coef * kl
                totals["kl"] += float(aggregate(kl.detach(), w))
            if cfg.loss.entropy_coef:
                per_token = per_token - cfg.loss.entropy_coef * entropy
            loss = aggregate(per_token, w)
            loss.backward()
            if piece.padding:
                continue  # weight 0: nothing to add (its masked statistics may be NaN)
            share = float(w.sum())  # this micro-batch's share of the mini-batch's token weight
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float(aggregate(entropy.detach(), w))
            for key in ("clipfrac", "approx_kl"):
                if key in stats:
                    totals[key] += float(stats[key]) * share
        if self.context.grouped:  # before the guard, so that every rank decides alike
            totals = dict(zip(totals, sum_over_ranks(list(totals.values()), self.context)))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        totals["grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        applied = self.guard.admit(totals["loss"], totals["grad_norm"])  # NonFiniteError at k
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradient memory held between steps
        self.state["skipped_steps"] = self.guard.skipped
        self.state["skipped_steps_in_a_row"] = self.guard.in_a_row
        return totals if applied else None

    def _micro_batches(
        self,
        batch: SequenceBatch,
        weights: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        reference: torch.Tensor | None,
        tis_weights: torch.Tensor | None,
    ) -> list[MicroBatch]:
        """The micro-batches of the mini-batch rows this rank trains on, each with its slices of
        the (N, T) and (N,) inputs; in a job, followed by zero-weight padding micro-batches up to
        the count of the rank with the most (FSDP needs the same passes on every rank)."""
        cfg = self.config
        local = None
        part = batch
        if self.context.grouped:
            local = torch.as_tensor(self._local_rows(batch, np.arange(len(batch))))
            part = batch.select(local)
        pieces = []
        for rows, mb in plan_micro_batches(
            part, size=cfg.update.micro_batch_size, max_tokens=cfg.update.max_tokens_per_micro_batch
        ):
            rows = rows if local is None else local.to(self.device)[rows]
            width = mb.input_ids.shape[1]
            pieces.append(
                MicroBatch(
                    mb,
                    weights[rows, :width],
                    old_logprobs[rows, :width],
                    advantages[rows],
                    None if reference is None else reference[rows, :width],
                    None if tis_weights is None else tis_weights[rows, :width],
                )
            )
        if not self.context.grouped:
            return pieces

        def padding() -> MicroBatch:
            zeros = torch.zeros((1, 2), device=self.device)
            return MicroBatch(
                padding_batch(self.tokenizer.pad_token_id, self.device),
                zeros,
                zeros,
                torch.zeros(1, device=self.device),
                None if reference is None else zeros,
                None if tis_weights is None else torch.ones((1, 2), device=self.device),
                padding=True,
            )

        return pad_to_common_count(pieces, padding, self.context)

    def _generation_metrics(
        self, presamples: Rollouts | None, rollouts: Rollouts
    ) -> dict[str, float]:
        out = {
            "samples": len(rollouts.samples),
            "train_accuracy": float(rollouts.scores.mean())
            if len(rollouts.samples)
            else float("nan"),
            "accepted_samples": int(rollouts.accepted.sum()),
            "response_tokens_mean": rollouts.tokens / max(len(rollouts.samples), 1),
            "truncated_share": float(
                np.mean([s.finish_reason == "length" for s in rollouts.samples])
            )
            if rollouts.samples
            else 0.0,
        }
        if presamples is not None:
            out["presamples"] = len(presamples.samples)
            out["presample_accuracy"] = float(presamples.scores.mean())
        return out

    def _counters(self) -> dict[str, Any]:
        s = self.state
        return {
            "samples_generated": s["samples_generated"],
            "tokens_generated": s["tokens_generated"],
            "total_optimizer_steps": s["optimizer_steps"],
            "total_skipped_steps": s["skipped_steps"],
            "wall_time": s["wall_time"],
            "world_size": self.context.world_size,
        }

    def _eval_due(self, iteration: int) -> bool:
        every = self.config.eval.every
        if not self.eval_records or every == 0:
            return False
        return iteration % every == 0 or iteration == self.config.iterations

    def _finish_iteration(self, metrics: dict[str, Any]) -> None:
        """Log first, then checkpoint: a kill between the two re-runs the iteration and the log is
        cut back to the checkpoint on resume, so each iteration appears exactly once."""
        self.metrics.log(
            {k: v for k, v in metrics.items() if k != "iteration"}, step=metrics["iteration"]
        )
        self.progress.log(_summary_line(metrics))
        self.state["iteration"] = metrics["iteration"]
        self.state["allocator"] = self.allocator.state_dict()
        save = (
            functools.partial(save_sharded_checkpoint, context=self.context)
            if self.context.grouped
            else save_checkpoint
        )
        save(
            self.output_dir,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
        )

    def _save_final(self) -> None:
        if self.context.grouped:
            save_final(
                self.output_dir / "final",
                context=self.context,
                model=self.model,
                tokenizer=self.tokenizer,
            )
            return
        with atomic_directory(self.output_dir / "final") as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)


@dataclass
class MicroBatch:
    """One forward/backward of an optimizer step: the rows and their slices of the step's inputs
    (token weights, pi_old, advantages, reference log-probs, TIS weights)."""

    batch: SequenceBatch
    weights: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    reference: torch.Tensor | None
    tis_weights: torch.Tensor | None
    padding: bool = False
    """A zero-weight micro-batch that only keeps a job's ranks in step."""


def minibatch_rows(
    group: np.ndarray, *, by: str, size: int, num_prompts: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices of each mini-batch of one epoch; every row lands in exactly one.

    by="prompts": `size` whole prompts per mini-batch (rows of prompt group[j]), so an iteration
    takes ceil(num_prompts / size) optimizer steps whatever the allocation gave each prompt (empty
    mini-batches, of prompts without samples, are dropped); by="samples": `size` rows each.
    """
    if by == "prompts":
        prompts = rng.permutation(num_prompts)
        chunks = [
            np.flatnonzero(np.isin(group, prompts[i : i + size]))
            for i in range(0, num_prompts, size)
        ]
    else:
        order = rng.permutation(len(group))
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return [c for c in chunks if c.size]


def _summary_line(metrics: dict[str, Any]) -> str:
    parts = [f"iter {metrics['iteration']}"]
    for key, fmt in (
        ("train_accuracy", "acc={:.3f}"),
        ("eval_accuracy", "eval={:.3f}"),
        ("loss", "loss={:.4f}"),
        ("samples_generated", "samples={}"),
        ("alloc_zero_share", "zero={:.2f}"),
        ("budget_shortfall", "short={}"),
        ("wall_time", "t={:.0f}s"),
    ):
        # NaN: not measured this iteration (no main samples under a rule that samples in rounds)
        if key in metrics and metrics[key] is not None and metrics[key] == metrics[key]:
            parts.append(fmt.format(metrics[key]))
    if metrics.get("skipped_steps"):
        parts.append(
            f"skipped={metrics['skipped_steps']} (non-finite; {metrics['total_skipped_steps']} "
            "in all)"
        )
    return " ".join(parts)


def train(config: TrainConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) a training run, in one process or as a rank of a torchrun job; returns
    the last iteration's metrics."""
    trainer = Trainer(config, output_dir)
    last = trainer.run()
    context = trainer.context
    # a vLLM engine leaves its own process groups when it is collected, which must happen
    # before the job's group is destroyed
    del trainer
    gc.collect()
    shutdown(context)
    return last
