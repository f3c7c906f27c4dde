"""Supervised warm start of the built-in tiny model on the built-in task.

RL needs a policy that already solves some prompts: with accept rate 0 everywhere there is no
signal, with 1 everywhere nothing to learn. A short supervised run on worked solutions puts the
built-in model in between (640 steps of batch 32 gave 41% accuracy at T=1.0 on the test split,
84% of prompts neither always nor never solved), which is where GVM allocation matters.

Recipe: random Qwen2 init, AdamW, linear warm-up then cosine decay, gradient clipping at 1.0,
cross-entropy on the solution tokens only (the prompt is given, not learned), each batch sorted
by length into micro-batches of at most `micro_batch_size` sequences padded only to their own
longest sequence (less padding: on 2 CPU cores ~1.5x faster than one padded batch).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gvmrl.data import format_prompt
from gvmrl.io import atomic_directory, write_json
from gvmrl.models import builtin_model_config, builtin_tokenizer
from gvmrl.progress import Progress
from gvmrl.task import builtin_problems

DEFAULT_STEPS = 640  # 54% held-out accuracy at T=1 (41% if annealed to lr 0; BENCHMARKS.md)
MIN_LR_RATIO = 0.1  # the learning rate decays to this share of its peak, not to 0
IGNORE_INDEX = -100  # label value the HF causal-LM loss skips


def encode_examples(tokenizer, problems) -> list[tuple[list[int], int]]:
    """Token ids of `prompt + solution + <|end|>` and the prompt length, per problem.

    The prompt is the chat-formatted problem without instruction (see gvmrl.models); the end
    token is part of the target so the model learns to stop.
    """
    prompts = [format_prompt(tokenizer, p.problem, None) for p in problems]
    targets = [p.solution + tokenizer.eos_token for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [(p + t, len(p)) for p, t in zip(prompt_ids, target_ids, strict=True)]


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are the ids on solution tokens, IGNORE elsewhere.

    Returns input_ids, attention_mask and labels, each (n, T) with T the longest length.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (n, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def learning_rate(
    step: int, total: int, peak: float, warmup: int, floor: float = MIN_LR_RATIO
) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then cosine decay to `floor * peak` at `total`.

    Why a floor rather than decay to 0: the checkpoint is a warm start for RL, not a final model.
    Annealed to 0, the built-in model (41% accuracy after 640 steps) sat in a sharp basin: later
    updates at lr 1e-4, even supervised steps on the reference solutions, lowered its accuracy.
    With the floor the same 640 steps give 54%, and supervised or RAFT++ steps at lr 1e-4 raise
    it (bench/controls.py, BENCHMARKS.md).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _batches(n_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless mini-batches of example indices, reshuffled each epoch."""
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _optimizer_step(
    model,
    optimizer: torch.optim.Optimizer,
    batch: list[tuple[list[int], int]],
    pad_id: int,
    micro_batch_size: int,
) -> tuple[float, int]:
    """One clipped AdamW step on the mean cross-entropy over all solution tokens of `batch`.

    Returns (loss, number of target tokens).
    """
    n_targets = sum(len(ids) - prompt_len for ids, prompt_len in batch)
    # Sorted by length, each micro-batch pads only to similar lengths: ~1.5x faster on CPU
    # than one padded batch of 32, and the same gradient since the loss is a sum over tokens.
    batch = sorted(batch, key=lambda example: len(example[0]))
    total_loss = 0.0
    for start in range(0, len(batch), micro_batch_size):
        micro = collate(batch[start : start + micro_batch_size], pad_id)
        micro_targets = int((micro["labels"][:, 1:] != IGNORE_INDEX).sum())
        # HF returns the mean over this micro-batch's targets; re-weight so the accumulated
        # gradient is that of the mean over the whole batch's targets.
        loss = model(**micro).loss * (micro_targets / n_targets)
        loss.backward()
        total_loss += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, n_targets


def pretrain(
    output_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    lr: float = 3e-3,
    min_lr_ratio: float = MIN_LR_RATIO,
    seed: int = 0,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    micro_batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Train the built-in model from scratch on the built-in train split; save it to `output_dir`.

    The checkpoint (model, tokenizer with chat template, generation config, `pretrain.json` with
    these metrics) is written to a temporary directory renamed over `output_dir` at the end, so an
    interrupted run leaves no partial checkpoint. Returns the metrics: steps, seconds,
    tokens_per_second (solution tokens trained per second), first_loss, final_loss (mean of the
    last 10% of steps), parameters, seed.
    """
    if steps < 1 or batch_size < 1 or micro_batch_size < 1:
        raise ValueError("steps, batch_size and micro_batch_size must be >= 1")
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = builtin_tokenizer()
    model = Qwen2ForCausalLM(builtin_model_config(tokenizer))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    examples = encode_examples(tokenizer, builtin_problems("default", "train"))
    batch_size = min(batch_size, len(examples))

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
    )
    model.train()
    losses: list[float] = []
    trained_tokens = 0
    log_every = max(1, steps // 20)
    with contextlib.ExitStack() as stack:
        display = (
            stack.enter_context(Progress()) if progress else None
        )  # rich bar on a terminal, else lines
        phase = display.phase("pretrain", total=steps) if display else None
        started = time.perf_counter()
        for step, indices in zip(range(steps), _batches(len(examples), batch_size, generator)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(
                    step, steps, lr, min(warmup_steps, steps), floor=min_lr_ratio
                )
            loss, n_targets = _optimizer_step(
                model,
                optimizer,
                [examples[i] for i in indices],
                tokenizer.pad_token_id,
                micro_batch_size,
            )
            losses.append(loss)
            trained_tokens += n_targets
            if display:
                display.advance(phase)
                if (step + 1) % log_every == 0:
                    display.log(f"pretrain step {step + 1}/{steps} loss {loss:.4f}")
        seconds = time.perf_counter() - started
        if display:
            display.end(phase)

    tail = losses[-max(1, steps // 10) :]
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "min_lr_ratio": min_lr_ratio,
        "seed": seed,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(trained_tokens / seconds, 1),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.eval()
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "pretrain.json", metrics)
    return metrics
