"""Everything a training run builds before its loop: its place in a torchrun job (or a plain
single process), the resume check, the policy (and KL reference; in a job, sharded, with a full
replica for rollouts) in its precision, the prompts that fit the model's context, the saved
config, the rollout engine, the optimizer and learning-rate schedule, the restored counters and
the metrics logger. `gvmrl.train.Trainer` composes these and then only runs Algorithm 1.

Order matters for bad input: the memory plan is checked before anything loads, and prompts are
checked against the context before the config is saved, so a run refused for either leaves
nothing in its output directory.

Randomness: `derive_seed(run seed, iteration, phase, ...)` gives every phase of every iteration
its own seed, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from gvmrl.activation_checkpointing import enable_gradient_checkpointing
from gvmrl.allocators import Allocator
from gvmrl.checkpoint import latest_checkpoint, load_trainer_state
from gvmrl.config import ConfigError, TrainConfig, load_config, save_config
from gvmrl.data import load_prompts
from gvmrl.distributed.checkpoint import find_sharded_checkpoint, load_sharded_checkpoint
from gvmrl.distributed.context import (
    ProcessContext,
    init_process_context,
    launch_environment,
    quiet_other_ranks,
)
from gvmrl.distributed.sharding import shard_model
from gvmrl.models import load_model_and_tokenizer
from gvmrl.precision import Precision
from gvmrl.prompt_length import fit_to_context
from gvmrl.records import PromptRecord
from gvmrl.rollout import RolloutEngine, make_engine
from gvmrl.runtime import resolve_device
from gvmrl.schedule import lr_scheduler
from gvmrl.tracking import MetricsLogger

# Keys of a saved config that may change when a run is resumed (extended or re-logged).
RESUMABLE_CHANGES = {"iterations", "logging", "eval", "threads", "distributed"}

PHASE_PRESAMPLE, PHASE_SAMPLE, PHASE_UPDATE, PHASE_EVAL, PHASE_DATA = range(5)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (run seed, iteration, phase, ...): the same on a resumed run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


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

    def extra(
        self, iteration: int, round: int, count: int, exclude: set[str] = frozenset()
    ) -> list[PromptRecord]:
        """Up to `count` further prompts for rules that draw beyond the batch (DAPO's rounds):
        the first of a permutation of all prompts seeded by (seed, iteration, round) whose ids
        are not in `exclude`; a pure function of its arguments, so resume stays exact."""
        order = np.random.default_rng(
            derive_seed(self.seed, iteration, PHASE_DATA, round)
        ).permutation(len(self.records))
        chosen: list[PromptRecord] = []
        for k in order:
            if len(chosen) == count:
                break
            if self.records[k].id not in exclude:
                chosen.append(self.records[k])
        return chosen

    def _index(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.records))
        order = np.random.default_rng(derive_seed(self.seed, PHASE_DATA, epoch)).permutation(
            len(self.records)
        )
        return int(order[offset])


def join_job(config: TrainConfig) -> ProcessContext:
    """This process's place in a torchrun job (process group with `distributed.timeout_s`; ranks
    other than 0 keep errors only), or, without torchrun, world size 1 on `config.device` without
    a process group: the plain run, unchanged."""
    if launch_environment() is None:
        return ProcessContext(0, 1, 0, resolve_device(config.device), None)
    context = init_process_context(config.device, timeout_s=config.distributed.timeout_s)
    quiet_other_ranks(context)
    return context


def find_checkpoint(config: TrainConfig, output_dir: Path, context: ProcessContext) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to resume a run with other
    settings. Writes nothing but the clean-up of a killed save's temporaries. In a job, rank 0
    looks (for a sharded checkpoint) and every rank gets its answer or raises its error."""
    if not context.grouped:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is not None:
            _check_resumable(output_dir / "config.yaml", config)
        return checkpoint

    def find() -> str | None:
        checkpoint = find_sharded_checkpoint(output_dir)
        if checkpoint is not None:
            _check_resumable(output_dir / "config.yaml", config)
        return None if checkpoint is None else str(checkpoint)

    found = on_main(find, context)
    return None if found is None else Path(found)


def on_main(work: Callable[[], Any], context: ProcessContext) -> Any:
    """`work()` on rank 0 and its result on every rank; when it raises, rank 0 raises its error
    and the others a ConfigError with its message, so no rank waits for the others forever."""
    outcome: tuple[str | None, Any] = (None, None)
    error: Exception | None = None
    if context.is_main:
        try:
            outcome = (None, work())
        except Exception as e:  # every rank must learn of it, whatever it is
            outcome, error = (str(e) or type(e).__name__, None), e
    outcome = context.broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise ConfigError(outcome[0])
    return outcome[1]


def save_run_config(config: TrainConfig, output_dir: Path, context: ProcessContext) -> None:
    """Create `output_dir` and save the config next to the run's outputs (rank 0 of a job)."""

    def save() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")

    on_main(save, context)


def configure_torch(config: TrainConfig) -> None:
    """CPU threads, the global seed, and no per-checkpoint progress bars from transformers."""
    if config.threads:
        torch.set_num_threads(config.threads)
    transformers.utils.logging.disable_progress_bar()  # per-checkpoint bars would drown the log
    torch.manual_seed(config.seed)


def load_policy(
    config: TrainConfig, checkpoint: Path | None, device: torch.device, precision: Precision
) -> tuple[Any, Any, torch.nn.Module | None]:
    """(policy, tokenizer, frozen KL reference or None). The policy resumes from `checkpoint`,
    in the parameter (master-weight) dtype, with gradient checkpointing when configured; the KL
    anchor is the initial policy, also after a resume, held in the compute dtype (it is only
    ever run forward)."""
    model, tokenizer = load_model_and_tokenizer(
        str(checkpoint) if checkpoint else config.model,
        device=device,
        dtype=precision.param_dtype,
    )
    reference = None
    if config.loss.kl_coef > 0:
        initial = (
            load_model_and_tokenizer(config.model, device=device, dtype=precision.param_dtype)[0]
            if checkpoint
            else model
        )
        reference = copy.deepcopy(initial).to(precision.compute_dtype).eval()
        reference.requires_grad_(False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer, reference


def load_sharded_policy(
    config: TrainConfig, context: ProcessContext, precision: Precision
) -> tuple[Any, Any, torch.nn.Module | None, torch.nn.Module]:
    """A job's (policy sharded with FSDP2, tokenizer, KL reference or None, replica): the initial
    weights of `config.model` (a resume then loads the sharded checkpoint into the policy), the
    reference and a frozen full `replica` copied before sharding. The replica serves rollouts,
    pi_old and gradient norms without collectives (`sharding.sync_replica` refreshes it)."""
    model, tokenizer = load_model_and_tokenizer(
        config.model, device=context.device, dtype=precision.param_dtype
    )
    reference = None
    if config.loss.kl_coef > 0:
        reference = copy.deepcopy(model).to(precision.compute_dtype).eval()
        reference.requires_grad_(False)
    replica = copy.deepcopy(model).eval()
    replica.requires_grad_(False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    shard_model(model, context.mesh, compute_dtype=precision.compute_dtype)
    return model, tokenizer, reference, replica


def build_engine(
    config: TrainConfig, model: Any, tokenizer: Any, precision: Precision
) -> tuple[RolloutEngine, Callable[[], contextlib.AbstractContextManager[None]]]:
    """The configured rollout engine on the policy, with that engine's options, and the context
    its `generate` calls run in: the HF engine runs the training model, so under the run's
    autocast; vLLM holds its own weights in the compute dtype (`engine_options`) and must not
    see the trainer's autocast."""
    if config.rollout.engine == "hf":
        options: dict[str, Any] = {"max_batch_sequences": config.rollout.batch_size}
        context = precision.autocast
    else:
        from gvmrl.rollout.vllm import engine_options

        options = engine_options(config, precision)
        context = contextlib.nullcontext
    return make_engine(config.rollout.engine, model, tokenizer, **options), context


@dataclass
class RunData:
    """The prompts of a run that fit the model's context, and what was left out for length."""

    stream: PromptStream
    eval_records: list[PromptRecord]
    notes: list[str] = field(default_factory=list)
    """One line per source that lost prompts to `data.overlong: skip`, for the log."""


def load_data(
    config: TrainConfig, tokenizer: Any, instruction: str | None, context: int | None
) -> RunData:
    """Training prompt stream and held-out records, each prompt checked against the model's
    `context` (`gvmrl.prompt_length.fit_to_context`, per `data.overlong`): an overlong prompt is
    skipped and counted, or fails (InputError naming the source and prompt)."""
    fields = dict(
        preset=config.data.preset,
        problem_field=config.data.problem_field,
        answer_field=config.data.answer_field,
    )
    notes: list[str] = []

    def fitted(source: str, split: str, limit: int | None = None) -> list[PromptRecord]:
        fit = fit_to_context(
            load_prompts(source, split=split, limit=limit, **fields),
            tokenizer,
            instruction,
            context=context,
            max_new_tokens=config.rollout.max_new_tokens,
            overlong=config.data.overlong,
            source=source,
        )
        if fit.skipped:
            notes.append(
                f"data: skipped {len(fit.skipped)} {split} prompts of {source} longer than "
                f"{fit.max_prompt_tokens} tokens (the model's context minus "
                "rollout.max_new_tokens; data.overlong: error stops instead)"
            )
        return fit.records

    stream = PromptStream(
        fitted(config.train_data, "train", config.data.train_limit),
        config.prompts_per_iteration,
        config.seed,
    )
    eval_records = (
        fitted(config.eval_data, "test", config.data.eval_limit) if config.eval_data else []
    )
    return RunData(stream, eval_records, notes)


def build_optimizer(
    config: TrainConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its schedule over the run's expected optimizer steps (`gvmrl.schedule`)."""
    o = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    steps_per_iteration = config.update.epochs * math.ceil(
        config.prompts_per_iteration / config.update.minibatch_size
    )
    scheduler = lr_scheduler(
        optimizer,
        warmup_steps=o.warmup_steps,
        total_steps=max(1, config.iterations * steps_per_iteration),
        schedule=o.schedule,
    )
    return optimizer, scheduler


def restore_state(
    checkpoint: Path | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    allocator: Allocator,
    *,
    sharded: tuple[torch.nn.Module, ProcessContext] | None = None,
) -> dict[str, Any]:
    """The run's counters: zero for a fresh run; for a resumed one the saved counters, with the
    optimizer, scheduler, RNG and allocation-rule states restored in place. `sharded`: a job's
    (sharded policy, context), whose weights come from the sharded checkpoint too."""
    fresh = {
        "iteration": 0,
        "samples_generated": 0,
        "tokens_generated": 0,
        "optimizer_steps": 0,
        "skipped_steps": 0,
        "skipped_steps_in_a_row": 0,
        "wall_time": 0.0,
        "allocator": allocator.state_dict(),
    }
    if checkpoint is None:
        return fresh
    if sharded is None:
        state = load_trainer_state(checkpoint, optimizer, scheduler)
    else:
        model, context = sharded
        state = load_sharded_checkpoint(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, rank=context.rank
        )
    allocator.load_state_dict(state.get("allocator", {}))
    return {**fresh, **state}  # counters added since the checkpoint was written start at 0


class SilentMetrics:
    """The metrics logger of ranks other than 0: rank 0 alone writes a job's metrics."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics_logger(
    config: TrainConfig, output_dir: Path, resume_after: int | None, context: ProcessContext
) -> MetricsLogger | SilentMetrics:
    """DIR/metrics.jsonl (cut back to `resume_after` on resume), TensorBoard, W&B; on rank 0."""
    if not context.is_main:
        return SilentMetrics()
    return MetricsLogger(
        output_dir,
        tensorboard=config.logging.tensorboard,
        wandb_project=config.logging.wandb_project,
        wandb_run_name=config.logging.wandb_run_name,
        config=config.to_dict(),
        resume_after=resume_after,
    )


def _check_resumable(saved_path: Path, config: TrainConfig) -> None:
    """Resuming with other settings would silently mix two runs: refuse, naming the keys."""
    if not saved_path.is_file():
        return
    saved = load_config(saved_path).to_dict()
    new = config.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and saved.get(k) != new[k]]
    if changed:
        raise ConfigError(
            f"{saved_path.parent}: holds a checkpoint of a run with other settings "
            f"({', '.join(changed)} differ); use a new --output-dir, or the saved settings to "
            "resume"
        )
