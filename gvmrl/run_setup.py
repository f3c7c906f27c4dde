"""Everything a training run builds before its loop: the output directory and resume check, the
policy (and KL reference), the rollout engine, the prompt stream, the optimizer and learning-rate
schedule, the restored counters and the metrics logger. `gvmrl.train.Trainer` composes these and
then only runs Algorithm 1.

Randomness: `derive_seed(run seed, iteration, phase, ...)` gives every phase of every iteration
its own seed, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from gvmrl.allocators import Allocator
from gvmrl.checkpoint import latest_checkpoint, load_trainer_state
from gvmrl.config import ConfigError, TrainConfig, load_config, save_config
from gvmrl.data import load_prompts
from gvmrl.models import load_model_and_tokenizer
from gvmrl.records import PromptRecord
from gvmrl.rollout import RolloutEngine, make_engine
from gvmrl.runtime import resolve_dtype
from gvmrl.schedule import lr_scheduler
from gvmrl.tracking import MetricsLogger

# Keys of a saved config that may change when a run is resumed (extended or re-logged).
RESUMABLE_CHANGES = {"iterations", "logging", "eval", "threads"}

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

    def _index(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.records))
        order = np.random.default_rng(derive_seed(self.seed, PHASE_DATA, epoch)).permutation(
            len(self.records)
        )
        return int(order[offset])


def prepare_output_dir(config: TrainConfig, output_dir: Path) -> Path | None:
    """Create `output_dir`, refuse to resume a run with other settings, save the config; return
    the checkpoint to resume from (None: a fresh run)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        _check_resumable(output_dir / "config.yaml", config)
    save_config(config, output_dir / "config.yaml")
    return checkpoint


def configure_torch(config: TrainConfig) -> None:
    """CPU threads, the global seed, and no per-checkpoint progress bars from transformers."""
    if config.threads:
        torch.set_num_threads(config.threads)
    transformers.utils.logging.disable_progress_bar()  # per-checkpoint bars would drown the log
    torch.manual_seed(config.seed)


def load_policy(
    config: TrainConfig, checkpoint: Path | None, device: torch.device
) -> tuple[Any, Any, torch.nn.Module | None]:
    """(policy, tokenizer, frozen KL reference or None). The policy resumes from `checkpoint`;
    the KL anchor is the initial policy, also after a resume."""
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_model_and_tokenizer(
        str(checkpoint) if checkpoint else config.model, device=device, dtype=dtype
    )
    reference = None
    if config.loss.kl_coef > 0:
        initial = (
            load_model_and_tokenizer(config.model, device=device, dtype=dtype)[0]
            if checkpoint
            else model
        )
        reference = copy.deepcopy(initial).eval()
        reference.requires_grad_(False)
    return model, tokenizer, reference


def build_engine(config: TrainConfig, model: Any, tokenizer: Any) -> RolloutEngine:
    """The configured rollout engine on the policy, with that engine's options."""
    if config.rollout.engine == "hf":
        options: dict[str, Any] = {"max_batch_sequences": config.rollout.batch_size}
    else:
        options = {
            "gpu_memory_utilization": config.rollout.gpu_memory_utilization,
            "seed": config.seed,
        }
    return make_engine(config.rollout.engine, model, tokenizer, **options)


def load_data(config: TrainConfig) -> tuple[PromptStream, list[PromptRecord]]:
    """(training prompt stream, held-out records)."""
    fields = dict(
        preset=config.data.preset,
        problem_field=config.data.problem_field,
        answer_field=config.data.answer_field,
    )
    stream = PromptStream(
        load_prompts(config.train_data, split="train", **fields),
        config.prompts_per_iteration,
        config.seed,
    )
    eval_records = (
        load_prompts(config.eval_data, split="test", limit=config.data.eval_limit, **fields)
        if config.eval_data
        else []
    )
    return stream, eval_records


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
) -> dict[str, Any]:
    """The run's counters: zero for a fresh run; for a resumed one the saved counters, with the
    optimizer, scheduler, RNG and allocation-rule states restored in place."""
    if checkpoint is None:
        return {
            "iteration": 0,
            "samples_generated": 0,
            "tokens_generated": 0,
            "optimizer_steps": 0,
            "wall_time": 0.0,
            "allocator": allocator.state_dict(),
        }
    state = load_trainer_state(checkpoint, optimizer, scheduler)
    allocator.load_state_dict(state.get("allocator", {}))
    return state


def open_metrics_logger(
    config: TrainConfig, output_dir: Path, resume_after: int | None
) -> MetricsLogger:
    """DIR/metrics.jsonl (cut back to `resume_after` on resume), TensorBoard, W&B."""
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
