"""The GVM-EM training loop (arXiv 2505.02391, Algorithm 1), resumable.

Each iteration:
  a. take the next chunk of prompts;
  b. allocation=gvm: draw N' pre-samples per prompt, grade them, estimate each prompt's accept rate
     p_i and gradient norm G_i, and allocate the budget N over prompts (`gvmrl.allocation`);
     allocation=uniform: n samples per prompt;
  c. draw n_i samples per prompt from the current policy and grade them;
  d. M-step: RAFT, RAFT++ or GRPO over mini-batches, AdamW;
  e. log, evaluate every k iterations, checkpoint.

`Trainer.iteration` is that list, one named step per line; the steps are methods below it.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from gvmrl.allocation import allocate
from gvmrl.batching import SequenceBatch, pack_sequences, token_logprobs
from gvmrl.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from gvmrl.config import ConfigError, TrainConfig, load_config, save_config
from gvmrl.data import PromptRecord, format_prompt, load_prompts
from gvmrl.estimation import per_sample_grad_norms, prompt_stats
from gvmrl.evaluation import evaluate
from gvmrl.io import atomic_directory
from gvmrl.losses import (
    clipped_policy_loss,
    compute_advantages,
    kl_penalty,
    raft_loss,
    token_weights,
)
from gvmrl.models import default_instruction, load_model_and_tokenizer
from gvmrl.progress import Progress
from gvmrl.rewards import REWARDS
from gvmrl.rollout import Sample, SamplingParams, make_engine
from gvmrl.tracking import MetricsLogger
from gvmrl.verify import Grader

# Keys of a saved config that may change when a run is resumed (extended or re-logged).
RESUMABLE_CHANGES = {"iterations", "logging", "eval", "threads"}


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
    def tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (run seed, iteration, phase): the same on a resumed run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


PHASE_PRESAMPLE, PHASE_SAMPLE, PHASE_UPDATE, PHASE_EVAL, PHASE_DATA = range(5)


class PromptStream:
    """Epochs over the training prompts, reshuffled per epoch by seed; batch k is a pure function
    of k, so a resumed run sees exactly the prompts the uninterrupted run would have."""

    def __init__(self, records: list[PromptRecord], batch_size: int, seed: int):
        if not records:
            raise ValueError("no training prompts")
        self.records, self.batch_size, self.seed = records, batch_size, seed

    def batch(self, iteration: int) -> list[PromptRecord]:
        start = (iteration - 1) * self.batch_size
        return [self.records[self._index(k)] for k in range(start, start + self.batch_size)]

    def _index(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.records))
        order = np.random.default_rng(derive_seed(self.seed, PHASE_DATA, epoch)).permutation(
            len(self.records)
        )
        return int(order[offset])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Trainer:
    """Holds the run's state (policy, optimizer, engine, data) and runs Algorithm 1."""

    def __init__(self, config: TrainConfig, output_dir: str | Path):
        self.config = config
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is not None:
            _check_resumable(self.output_dir / "config.yaml", config)
        save_config(config, self.output_dir / "config.yaml")

        if config.threads:
            torch.set_num_threads(config.threads)
        transformers.utils.logging.disable_progress_bar()  # per-checkpoint bars would drown the log
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            str(checkpoint) if checkpoint else config.model, device=self.device, dtype=dtype
        )
        self.reference = None
        if config.loss.kl_coef > 0:  # the KL anchor is the initial policy, also after a resume
            initial = (
                load_model_and_tokenizer(config.model, device=self.device, dtype=dtype)[0]
                if checkpoint
                else self.model
            )
            self.reference = _frozen_copy(initial)
        self.engine = make_engine(
            config.rollout.engine, self.model, self.tokenizer, **_engine_options(config)
        )
        self.grader = Grader(workers=config.verifier_workers, timeout=config.verifier_timeout)
        self.instruction = (
            default_instruction(self.model)
            if config.data.instruction == "auto"
            else config.data.instruction
        )
        data = dict(
            preset=config.data.preset,
            problem_field=config.data.problem_field,
            answer_field=config.data.answer_field,
        )
        self.stream = PromptStream(
            load_prompts(config.train_data, split="train", **data),
            config.prompts_per_iteration,
            config.seed,
        )
        self.eval_records = (
            load_prompts(config.eval_data, split="test", limit=config.data.eval_limit, **data)
            if config.eval_data
            else []
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))

        self.state: dict[str, Any] = {
            "iteration": 0,
            "samples_generated": 0,
            "tokens_generated": 0,
            "optimizer_steps": 0,
            "wall_time": 0.0,
        }
        if checkpoint is not None:
            self.state = load_trainer_state(checkpoint, self.optimizer, self.scheduler)
        self.metrics = MetricsLogger(
            self.output_dir,
            tensorboard=config.logging.tensorboard,
            wandb_project=config.logging.wandb_project,
            wandb_run_name=config.logging.wandb_run_name,
            config=config.to_dict(),
            resume_after=self.state["iteration"] if checkpoint is not None else None,
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
        cfg, m = self.config, Metrics()
        prompts = self.stream.batch(iteration)  # a.
        if cfg.allocation == "gvm":  # b.
            presamples = m.time(
                "presample",
                self.sample,
                prompts,
                [cfg.gvm.presamples] * len(prompts),
                iteration,
                PHASE_PRESAMPLE,
            )
            p, g = m.time("stats", self.estimate_prompt_stats, presamples)
            sizes = self.allocate(p, g, len(prompts))
            m.add(allocation_metrics(sizes, p, g, presamples))
        else:
            presamples, sizes = None, np.full(len(prompts), cfg.samples_per_prompt)
        rollouts = m.time("sample", self.sample, prompts, sizes, iteration, PHASE_SAMPLE)  # c.
        trained = (
            Rollouts.concat(presamples, rollouts)
            if presamples and (cfg.gvm.reuse_presamples or cfg.gvm.budget_inclusive)
            else rollouts
        )
        m.add(m.time("update", self.update, trained, iteration))  # d.
        m.add(self._generation_metrics(presamples, rollouts))  # e.
        if self._eval_due(iteration):
            m.add(m.time("eval", self.evaluate))
        return {"iteration": iteration, **self._counters(), **m.values}

    # ------------------------------------------------------------------------------------------
    # Steps

    def sample(self, prompts: list[PromptRecord], sizes, iteration: int, phase: int) -> Rollouts:
        """Draw sizes[i] responses to prompt i from the current policy and grade them."""
        cfg = self.config
        params = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=derive_seed(cfg.seed, iteration, phase),
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

    def estimate_prompt_stats(self, presamples: Rollouts) -> tuple[np.ndarray, np.ndarray]:
        """Accept rate p_i (optionally Beta-smoothed) and mean gradient norm G_i of accepted samples."""
        cfg = self.config.gvm
        norms = np.full(len(presamples.samples), np.nan)
        measured = measured_subset(presamples.group, presamples.scores > 0.5, cfg.grad_norm_samples)
        if measured.size:
            batch = self._pack([presamples.samples[i] for i in measured])
            norms[measured] = (
                per_sample_grad_norms(
                    self.model,
                    batch.input_ids,
                    batch.attention_mask,
                    batch.response_mask,
                    params=cfg.grad_params,
                    micro_batch_size=cfg.grad_batch_size,
                )
                .float()
                .cpu()
                .numpy()
            )
        stats = prompt_stats(presamples.group, presamples.scores, norms)
        # Every prompt has N' >= 1 pre-samples, in prompt order, so stats align with the batch.
        assert stats.prompt_ids == list(range(self.config.prompts_per_iteration))
        a, b = cfg.accept_prior
        p = (stats.num_accepted + a) / (stats.num_samples + a + b)
        return p, stats.grad_norm

    def allocate(self, p: np.ndarray, g: np.ndarray, num_prompts: int) -> np.ndarray:
        """n_i for the main samples: the whole budget, or what the pre-samples left of it."""
        cfg = self.config
        budget = cfg.gvm_budget - (
            cfg.gvm.presamples * num_prompts if cfg.gvm.budget_inclusive else 0
        )
        with warnings.catch_warnings():  # an empty allocation is reported through progress
            warnings.filterwarnings("ignore", message="allocate: every prompt has zero weight")
            sizes = allocate(
                p,
                g,
                budget,
                rule="gvm",
                alpha=cfg.gvm.alpha,
                beta=cfg.gvm.beta,
                min_size=cfg.gvm.min_size,
                max_size=cfg.gvm.max_size,
                drop_above=cfg.gvm.drop_above,
                min_expected_accepts=cfg.gvm.min_expected_accepts,
                uniform_share=cfg.gvm.uniform_share,
            )
        if budget and not sizes.any():
            self.progress.log(
                "no prompt qualified (no accepted pre-sample, or all filtered out): "
                "no samples allocated this iteration"
            )
        return sizes

    def update(self, rollouts: Rollouts, iteration: int) -> dict[str, float]:
        """M-step: advantages, then epochs of mini-batch AdamW steps on the chosen loss."""
        cfg = self.config
        if cfg.algorithm in ("raft", "raft++"):
            rollouts = rollouts.select(rollouts.scores > 0.5)  # rejection sampling: accepted only
        metrics = {"trained_samples": len(rollouts.samples), "optimizer_steps": 0}
        if not rollouts.samples:
            return metrics  # nothing accepted: skip the step rather than take an empty one
        estimator = (
            "raft++"
            if cfg.algorithm != "grpo"
            else ("grpo" if cfg.loss.grpo_scale_by_std else "grpo-no-std")
        )
        group = torch.as_tensor(rollouts.group)
        advantages = compute_advantages(estimator, torch.as_tensor(rollouts.scores), group)
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
        self, batch: SequenceBatch, old_logprobs, advantages, group
    ) -> dict[str, float]:
        """One optimizer step on a mini-batch, accumulated over micro-batches. The token weights are
        computed over the whole mini-batch, so the accumulated gradient equals the full-batch one."""
        cfg = self.config
        weights = token_weights(batch.response_mask, cfg.loss.aggregation, group).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "kl": 0.0, "entropy": 0.0}
        micro = cfg.update.micro_batch_size
        for start in range(0, len(batch), micro):
            rows = slice(start, start + micro)
            mb = _trim(batch.select(rows))
            width = mb.input_ids.shape[1]
            w = weights[rows, :width]
            logp, entropy = token_logprobs(
                self.model, mb, temperature=cfg.rollout.temperature, with_entropy=True
            )
            if cfg.algorithm == "raft":
                per_token, stats = raft_loss(logp, mb.response_mask), {}
            else:
                per_token, stats = clipped_policy_loss(
                    logp,
                    old_logprobs[rows, :width],
                    advantages[rows].to(self.device),
                    mb.response_mask,
                    clip_low=cfg.loss.clip_low,
                    clip_high=cfg.loss.clip_high,
                    dual_clip=cfg.loss.dual_clip,
                )
            if self.reference is not None:
                with torch.no_grad():
                    ref = token_logprobs(self.reference, mb, temperature=cfg.rollout.temperature)
                kl = kl_penalty(logp, ref, cfg.loss.kl_kind)
                per_token = per_token + cfg.loss.kl_coef * kl
                totals["kl"] += float((kl.detach() * w).sum())
            if cfg.loss.entropy_coef:
                per_token = per_token - cfg.loss.entropy_coef * entropy
            loss = (per_token * w).sum()
            loss.backward()
            share = float(w.sum())  # this micro-batch's share of the mini-batch's token weight
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float((entropy.detach() * w).sum())
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
            "accepted_samples": int((rollouts.scores > 0.5).sum()),
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


class Metrics:
    """Collects an iteration's metrics and the time of each phase (`time_<phase>`)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def time(self, phase: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.values[f"time_{phase}"] = time.perf_counter() - start
        return result

    def add(self, values: dict[str, Any]) -> None:
        self.values.update(values)


def allocation_metrics(
    sizes: np.ndarray, p: np.ndarray, g: np.ndarray, presamples: Rollouts
) -> dict[str, float]:
    """How the budget was spread: share of prompts left out, largest n_i, entropy of n / N, and
    how G_i relates to p_i (CALIBRATION.md saw a strong negative correlation)."""
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


def _trim(batch: SequenceBatch) -> SequenceBatch:
    """Drop the all-padding columns at the right of a right-padded micro-batch."""
    width = int(batch.attention_mask.sum(dim=1).max())
    return SequenceBatch(
        batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.response_mask[:, :width]
    )


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _engine_options(config: TrainConfig) -> dict[str, Any]:
    if config.rollout.engine == "hf":
        return {"max_batch_sequences": config.rollout.batch_size}
    return {"gpu_memory_utilization": config.rollout.gpu_memory_utilization, "seed": config.seed}


def _lr_lambda(config: TrainConfig):
    """Linear warm-up, then constant or cosine decay over the run's expected optimizer steps."""
    o = config.optim
    steps_per_iteration = config.update.epochs * math.ceil(
        config.prompts_per_iteration / config.update.minibatch_size
    )
    total = max(1, config.iterations * steps_per_iteration)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _check_resumable(saved_path: Path, config: TrainConfig) -> None:
    """Resuming with other settings would silently mix two runs: refuse, naming the keys."""
    if not saved_path.is_file():
        return
    saved = load_config(saved_path).to_dict()
    new = config.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and saved.get(k) != new[k]]
    if changed:
        raise ConfigError(
            f"{saved_path.parent}: holds a checkpoint of a run with other settings ({', '.join(changed)} differ); "
            "use a new --output-dir, or the saved settings to resume"
        )


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
