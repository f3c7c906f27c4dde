"""Global statistics from per-rank pieces, so that K ranks compute what one process computes.

The pattern: every rank holds some rows of a global table (pre-samples, samples) with their
global row index; `gather_rows` gives every rank the whole table in global order, and the
single-process functions (`estimation.prompt_stats`, `losses.compute_advantages`,
`losses.token_weights`) then run unchanged on it. Each row has exactly one owner and the others
add 0, so the sum over ranks is exact: the statistics are bit-identical to one process's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from gvmrl.batching import SequenceBatch
from gvmrl.distributed.context import ProcessContext

T = TypeVar("T")


def _all_reduce(values: torch.Tensor, context: ProcessContext, op: dist.ReduceOp) -> torch.Tensor:
    if not context.grouped:
        return values
    on_device = values.to(context.device)  # NCCL reduces device tensors only
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


def gather_rows(index, rows, total: int, context: ProcessContext) -> np.ndarray:
    """The (total, C) float64 table whose row index[j] is this rank's rows[j], from every rank.

    Every row must be given by exactly one rank (ValueError otherwise, raised on every rank):
    a row missing or given twice would silently change the statistics. NaN rows pass through.

    Args:
        index: (m,) int, global row of each local row.
        rows: (m, C) float (int values stay exact up to 2^53).
        total: number of global rows.
    """
    index = np.asarray(index, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.float64)
    # a rank with no rows gives (0, C); reshape(0, -1) cannot infer C
    rows = rows.reshape(index.size, -1) if index.size else rows.reshape(0, rows.shape[-1])
    if index.size and not (0 <= index.min() and index.max() < total):
        raise ValueError(f"row indices must be in [0, {total})")
    table = np.zeros((total, rows.shape[1] + 1))
    table[index, :-1] = rows
    np.add.at(table[:, -1], index, 1.0)  # how many ranks (and rows) claim each global row
    summed = _all_reduce(torch.from_numpy(table), context, dist.ReduceOp.SUM).numpy()
    claims = summed[:, -1]
    if (claims != 1).any():
        bad = int(np.flatnonzero(claims != 1)[0])
        raise ValueError(f"global row {bad} is given by {int(claims[bad])} rows instead of one")
    return summed[:, :-1]


def sum_over_ranks(values: list[float], context: ProcessContext) -> list[float]:
    """Element-wise float64 sums of every rank's `values` (one process: `values`)."""
    summed = _all_reduce(torch.tensor(values, dtype=torch.float64), context, dist.ReduceOp.SUM)
    return summed.tolist()


def max_over_ranks(value: int, context: ProcessContext) -> int:
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), context, dist.ReduceOp.MAX))


def pad_to_common_count(
    micro_batches: list[T], padding: Callable[[], T], context: ProcessContext
) -> list[T]:
    """This rank's micro-batches, followed by `padding()` ones up to the most any rank has.

    FSDP all-gathers and reduce-scatters in every forward and backward, so every rank must run
    the same number of them; a padding micro-batch carries zero loss weight (`padding_batch`).
    """
    count = max_over_ranks(len(micro_batches), context)
    return micro_batches + [padding() for _ in range(count - len(micro_batches))]


def padding_batch(pad_id: int, device: torch.device | str = "cpu") -> SequenceBatch:
    """One row of two pad tokens with no response token: a forward and backward through every
    parameter (the output layer too: one token is predicted) that adds nothing to any gradient
    once its loss weight is 0."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    return SequenceBatch(ids, torch.ones_like(ids), torch.zeros((1, 2))).to(device)
