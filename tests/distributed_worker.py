"""Worker for tests/test_distributed.py, launched by `torchrun --nproc-per-node 2` (not a test).

Modes:
  train INIT BATCH OUT: FSDP2 over the ranks, 3 AdamW steps on the global batch in BATCH (each
      rank its dealt rows, globally normalised token weights, padded micro-batches); a sharded
      checkpoint after step 2; the final plain HF checkpoint; then a fresh model and optimizer
      resumed from the checkpoint take step 3 again. Rank 0 saves weights and gradient norms.
  kill: rank 1 kills itself with SIGKILL while rank 0 keeps calling collectives.
  hang: rank 1 stops calling collectives (alive); rank 0's collective must time out.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gvmrl.batching import pack_sequences
from gvmrl.distributed.checkpoint import (
    load_sharded_checkpoint,
    save_final,
    save_sharded_checkpoint,
)
from gvmrl.distributed.context import init_process_context, shutdown
from gvmrl.distributed.dealing import deal_samples
from gvmrl.distributed.reduction import (
    gather_rows,
    pad_to_common_count,
    padding_batch,
)
from gvmrl.distributed.sharding import full_state_dict, policy_logprobs, shard_model
from gvmrl.losses import token_weights

MICRO_BATCH = 2
CLIP = 0.5
LR = 1e-4  # realistic for RL; Adam turns float noise in near-zero gradients into lr-sized steps
AGGREGATION = "prompt-mean"


def sharded_policy(init: str, context):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(init)
    shard_model(model, context.mesh, compute_dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, AutoTokenizer.from_pretrained(init), optimizer, scheduler


def train_step(model, optimizer, scheduler, batch: dict, context) -> float:
    """One optimizer step on this rank's dealt rows of the global batch."""
    sizes = np.bincount(batch["group"])
    offsets = np.cumsum(sizes) - sizes
    share = deal_samples(sizes, batch["expected_tokens"], context.world_size)[context.rank]
    mine = offsets[share[:, 0]] + share[:, 1]  # global rows of this rank
    # as the trainer: token weights over the whole mini-batch, then this rank's rows (a row's
    # weight is the same at each of its response tokens)
    everything = pack_sequences(batch["prompts"], batch["responses"], batch["pad_id"])
    group = torch.as_tensor(batch["group"])
    weights = token_weights(everything.response_mask, AGGREGATION, group).amax(dim=1)
    packed = pack_sequences(
        [batch["prompts"][j] for j in mine], [batch["responses"][j] for j in mine], batch["pad_id"]
    )
    micro = [
        (packed.select(slice(s, s + MICRO_BATCH)), weights[mine[s : s + MICRO_BATCH]])
        for s in range(0, len(mine), MICRO_BATCH)
    ]
    micro = pad_to_common_count(
        micro, lambda: (padding_batch(batch["pad_id"]), torch.zeros(1)), context
    )
    logprobs = policy_logprobs(model)
    optimizer.zero_grad(set_to_none=True)
    for mb, row_weight in micro:
        logp = logprobs(mb)
        (-(logp * mb.response_mask * row_weight[:, None])).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    scheduler.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train(init: str, batch_path: str, out: str) -> None:
    context = init_process_context("cpu")
    batch = torch.load(batch_path, weights_only=False)
    table = batch["table"]  # rank r holds rows r, r + K, ...: every rank gets the whole table
    mine = np.arange(context.rank, len(table), context.world_size)
    gathered = gather_rows(mine, table[mine], len(table), context)
    model, tokenizer, optimizer, scheduler = sharded_policy(init, context)
    norms = [train_step(model, optimizer, scheduler, batch, context) for _ in range(2)]
    parts = {"model": model, "tokenizer": tokenizer, "optimizer": optimizer}
    save_sharded_checkpoint(
        out, context=context, scheduler=scheduler, state={"iteration": 2}, **parts
    )
    norms.append(train_step(model, optimizer, scheduler, batch, context))
    weights = full_state_dict(model, main_only=True)
    save_final(Path(out) / "final", context=context, model=model, tokenizer=tokenizer)

    model, tokenizer, optimizer, scheduler = sharded_policy(init, context)  # fresh: initial weights
    latest = Path(out) / "checkpoints" / "latest"
    state = load_sharded_checkpoint(
        latest, model=model, optimizer=optimizer, scheduler=scheduler, rank=context.rank
    )
    resumed_norm = train_step(model, optimizer, scheduler, batch, context)
    resumed = full_state_dict(model, main_only=True)
    if context.is_main:
        torch.save(
            {
                "gathered": gathered,
                "weights": weights,
                "norms": norms,
                "resumed": resumed,
                "resumed_norm": resumed_norm,
                "state": state,
            },
            Path(out) / "result.pt",
        )
    shutdown(context)


def fail(mode: str) -> None:
    context = init_process_context("cpu", timeout_s=5.0)
    value = torch.ones(1)
    for step in range(100_000):
        if context.rank == 1 and step == 10:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # hang: alive, but no longer in any collective
        dist.all_reduce(value)
        time.sleep(0.01)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(*sys.argv[2:5])
    else:
        fail(sys.argv[1])
