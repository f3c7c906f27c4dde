"""Supervised warm start of the built-in tiny model on the built-in task.

RL needs a policy that already solves some prompts: with accept rate 0 everywhere there is no
signal, with 1 everywhere nothing to learn. A short supervised run on worked solutions puts the
built-in model in between (640 steps of batch 32 gave 41% accuracy at T=1.0 on the test split,
84% of prompts neither always nor never solved), which is where GVM allocation matters.

Recipe: random Qwen2 init, AdamW, the warm-up + cosine schedule of `gvmrl.schedule` decaying to a
floor, gradient clipping at 1.0, and the RAFT loss (negative log-likelihood) on the solution
tokens only (the prompt is given, not learned), averaged over all solution tokens of the batch.
Batches are packed by `gvmrl.batching`; each batch is sorted by length into micro-batches of at
most `micro_batch_size` sequences padded only to their own longest sequence (less padding: on 2
CPU cores ~1.5x faster than one padded batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gvmrl.batching import micro_batches, pack_sequences, token_logprobs
from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer
from gvmrl.builtin.task import TaskProblem, builtin_problems
from gvmrl.data import format_prompt
from gvmrl.io import atomic_directory, write_json
from gvmrl.losses import aggregate, raft_loss, token_weights
from gvmrl.progress import Progress
from gvmrl.schedule import lr_scheduler

DEFAULT_STEPS = 640  # 54% held-out accuracy at T=1 (41% if annealed to lr 0; BENCHMARKS.md)
# The learning rate decays to this share of its peak, not to 0. Why a floor: the checkpoint is a
# warm start for RL, not a final model. Annealed to 0, the built-in model (41% accuracy after 640
# steps) sat in a sharp basin: later updates at lr 1e-4, even supervised steps on the reference
# solutions, lowered its accuracy. With the floor the same 640 steps give 54%, and supervised or
# RAFT++ steps at lr 1e-4 raise it (bench/controls.py, BENCHMARKS.md).
MIN_LR_RATIO = 0.1

Example = tuple[list[int], list[int]]  # (prompt ids, solution ids + end token)


def encode_examples(tokenizer, problems: Sequence[TaskProblem]) -> list[Example]:
    """(prompt ids, target ids) per problem: the prompt is the chat-formatted problem without
    instruction (see gvmrl.builtin.model), the target the solution followed by the end token, so
    the model learns to stop."""
    prompts = [format_prompt(tokenizer, p.problem, None) for p in problems]
    targets = [p.solution + tokenizer.eos_token for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return list(zip(prompt_ids, target_ids, strict=True))


def _batches(n_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless mini-batches of example indices, reshuffled each epoch."""
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def accumulate_gradients(
    model, batch: list[Example], pad_id: int, micro_batch_size: int
) -> tuple[float, int]:
    """Gradient of the mean negative log-likelihood over all target tokens of `batch`,
    accumulated over micro-batches. Returns (loss, number of target tokens)."""
    # Sorted by length, each micro-batch pads only to similar lengths: ~1.5x faster on CPU
    # than one padded batch of 32, and the same gradient since the loss is a sum over tokens.
    batch = sorted(batch, key=lambda example: len(example[0]) + len(example[1]))
    packed = pack_sequences([p for p, _ in batch], [t for _, t in batch], pad_id)
    weights = token_weights(packed.response_mask, "token-mean")  # 1 / (target tokens of the batch)
    total_loss = 0.0
    for rows, micro in micro_batches(packed, micro_batch_size):
        logprobs = token_logprobs(model, micro)
        width = micro.input_ids.shape[1]
        loss = aggregate(raft_loss(logprobs, micro.response_mask), weights[rows, :width])
        loss.backward()
        total_loss += loss.item()
    return total_loss, int(packed.response_mask.sum())


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
    scheduler = lr_scheduler(
        optimizer, warmup_steps=min(warmup_steps, steps), total_steps=steps, floor=min_lr_ratio
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
            loss, n_targets = accumulate_gradients(
                model, [examples[i] for i in indices], tokenizer.pad_token_id, micro_batch_size
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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

