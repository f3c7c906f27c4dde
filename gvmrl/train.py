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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gvmrl.algorithms import ALGORITHMS
from gvmrl.allocators import AllocationContext, make_allocator
from gvmrl.batching import SequenceBatch, micro_batches, pack_sequences, token_logprobs
from gvmrl.checkpoint import save_checkpoint
from gvmrl.config import TrainConfig
from gvmrl.data import format_prompt
from gvmrl.estimation import per_sample_grad_norms
from gvmrl.evaluation import evaluate
from gvmrl.io import atomic_directory
from gvmrl.losses import aggregate, kl_penalty, token_weights
from gvmrl.progress import Progress
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
    load_data,
    load_policy,
    open_metrics_logger,
    prepare_output_dir,
    restore_state,
)
from gvmrl.runtime import instruction_for, resolve_device
from gvmrl.timing import IterationMetrics
from gvmrl.verify import Grader


class Trainer:
    """Holds the run's state (policy, optimizer, engine, data) and runs Algorithm 1."""

    def __init__(self, config: TrainConfig, output_dir: str | Path):
        self.config = config.validate()
        self.output_dir = Path(output_dir)
        checkpoint = prepare_output_dir(config, self.output_dir)
        configure_torch(config)
        self.device = resolve_device(config.device)
        self.model, self.tokenizer, self.reference = load_policy(config, checkpoint, self.device)
        self.engine = build_engine(config, self.model, self.tokenizer)
        self.grader = Grader(workers=config.verifier_workers, timeout=config.verifier_timeout)
        self.instruction = instruction_for(self.model, config.data.instruction)
        self.stream, self.eval_records = load_data(config)
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.algorithm = ALGORITHMS[config.algorithm]
        self.allocator = make_allocator(config)
        self.state = restore_state(checkpoint, self.optimizer, self.scheduler, self.allocator)
        self.metrics = open_metrics_logger(
            config, self.output_dir, self.state["iteration"] if checkpoint is not None else None
        )
        self.progress = Progress(enabled=config.logging.progress)

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> dict[str, Any]:
        """Train from the last finished iteration to `config.iterations`; returns the last metrics."""
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
        with timer("update"):  # d.
            update = self.update(allocation.training_rollouts(rollouts), iteration)
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
        self.engine.sync_weights(self.model)
        texts = [format_prompt(self.tokenizer, r.problem, self.instruction) for r in prompts]
        samples = self.engine.generate(texts, [int(n) for n in sizes], params)
        grades = self.grader.grade_many(
            [s.text for s in samples], [prompts[s.prompt_index].answer for s in samples]
        )
        reward = REWARDS[cfg.reward]
        scores = np.array([reward(gr, s.text) for gr, s in zip(grades, samples)], dtype=np.float64)
        group = np.array([s.prompt_index for s in samples], dtype=np.int64)
        self.state["samples_generated"] += len(samples)
        self.state["tokens_generated"] += sum(len(s.response_ids) for s in samples)
        return Rollouts(samples, scores, group)

    def update(self, rollouts: Rollouts, iteration: int) -> dict[str, float]:
        """M-step: advantages, then epochs of mini-batch AdamW steps on the algorithm's loss."""
        cfg = self.config
        rollouts = rollouts.select(self.algorithm.trains_on(rollouts.scores))
        metrics = {"trained_samples": len(rollouts.samples), "optimizer_steps": 0}
        if not rollouts.samples:
            return metrics  # nothing to train on: skip the step rather than take an empty one
        group = torch.as_tensor(rollouts.group)
        advantages = self.algorithm.advantages(torch.as_tensor(rollouts.scores), group, cfg.loss)
        # GRPO: samples in groups whose rewards are all equal carry no policy gradient
        metrics["zero_advantage_share"] = float((advantages == 0).float().mean())
        batch = self._pack(rollouts.samples)
        old_logprobs = self._old_logprobs(rollouts.samples, batch)
        rng = np.random.default_rng(derive_seed(cfg.seed, iteration, PHASE_UPDATE))
        sums: dict[str, float] = {}
        self.model.train()
        for _ in range(cfg.update.epochs):
            for rows in minibatch_rows(
                rollouts.group,
                by=cfg.update.minibatch_by,
                size=cfg.update.minibatch_size,
                num_prompts=cfg.prompts_per_iteration,
                rng=rng,
            ):
                step = self._optimizer_step(
                    batch.select(rows), old_logprobs[rows], advantages[rows], group[rows]
                )
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
        self.engine.sync_weights(self.model)
        result = evaluate(
            self.engine,
            self.tokenizer,
            self.eval_records,
            samples=cfg.eval.samples,
            params=params,
            grader=self.grader,
            instruction=self.instruction,
        )
        return {
            "eval_accuracy": result.accuracy,
            **{f"eval_pass@{k}": v for k, v in result.pass_at_k.items()},
        }

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _allocation_context(self, iteration: int, timer) -> AllocationContext:
        def sample(prompts: list[PromptRecord], sizes: Sequence[int], round: int = 0) -> Rollouts:
            return self.sample(prompts, sizes, iteration, PHASE_PRESAMPLE, round)

        def grad_norms(samples: list[Sample], params: str, micro_batch_size: int) -> np.ndarray:
            batch = self._pack(samples)
            norms = per_sample_grad_norms(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                batch.response_mask,
                params=params,
                micro_batch_size=micro_batch_size,
            )
            return norms.float().cpu().numpy()

        return AllocationContext(sample, grad_norms, timer, self.progress.log)

    def _pack(self, samples: list[Sample]) -> SequenceBatch:
        return pack_sequences(
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            self.tokenizer.pad_token_id,
        ).to(self.device)

    def _old_logprobs(self, samples: list[Sample], batch: SequenceBatch) -> torch.Tensor:
        """pi_old of each response token: the sampling policy's log-probs, placed on the (N, T)
        grid of `batch`. The HF engine samples from the very weights being trained, so these
        equal a fresh forward pass (tested); vLLM's may differ slightly, as in verl with rollout
        log-probs."""
        old = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for j, s in enumerate(samples):
            start = len(s.prompt_ids)
            old[j, start : start + len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        return old.to(self.device)

    def _optimizer_step(
        self,
        batch: SequenceBatch,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        group: torch.Tensor,
    ) -> dict[str, float]:
        """One optimizer step on a mini-batch, accumulated over micro-batches. The token weights are
        computed over the whole mini-batch, so the accumulated gradient equals the full-batch one."""
        cfg = self.config
        weights = token_weights(batch.response_mask, cfg.loss.aggregation, group).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "kl": 0.0, "entropy": 0.0}
        for rows, mb in micro_batches(batch, cfg.update.micro_batch_size):
            width = mb.input_ids.shape[1]
            w = weights[rows, :width]
            logp, entropy = token_logprobs(
                self.model, mb, temperature=cfg.rollout.temperature, with_entropy=True
            )
            per_token, stats = self.algorithm.per_token_loss(
                logp,
                old_logprobs[rows, :width],
                advantages[rows].to(self.device),
                mb.response_mask,
                cfg.loss,
            )
            if self.reference is not None:
                with torch.no_grad():
                    ref = token_logprobs(self.reference, mb, temperature=cfg.rollout.temperature)
                kl = kl_penalty(logp, ref, cfg.loss.kl_kind)
                per_token = per_token + cfg.loss.kl_coef * kl
                totals["kl"] += float(aggregate(kl.detach(), w))
            if cfg.loss.entropy_coef:
                per_token = per_token - cfg.loss.entropy_coef * entropy
            loss = aggregate(per_token, w)
            loss.backward()
            share = float(w.sum())  # this micro-batch's share of the mini-batch's token weight
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float(aggregate(entropy.detach(), w))
            for key in ("clipfrac", "approx_kl"):
                if key in stats:
                    totals[key] += float(stats[key]) * share
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.optimizer.step()
        self.scheduler.step()
        return totals

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
            "wall_time": s["wall_time"],
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
        save_checkpoint(
            self.output_dir,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
        )

    def _save_final(self) -> None:
        with atomic_directory(self.output_dir / "final") as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)


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
        ("wall_time", "t={:.0f}s"),
    ):
        if key in metrics and metrics[key] is not None:
            parts.append(fmt.format(metrics[key]))
    return " ".join(parts)


def train(config: TrainConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last iteration's metrics."""
    return Trainer(config, output_dir).run()
