"""Sharded training checkpoints (torch.distributed.checkpoint) and the final plain HF checkpoint.

DIR/checkpoints/latest holds `sharded/` (DCP: every rank writes its shards of the model and
optimizer state, rank 0 the metadata; loadable at another world size), `rng-<rank>.pt`, and from
rank 0 `scheduler.pt`, `state.json` (as in `gvmrl.checkpoint`), the model config and the
tokenizer. All ranks write into one temporary directory that rank 0 renames into place after a
barrier, so a `kill -9` of any rank at any moment leaves the previous complete checkpoint. The
directory must be on a filesystem every node sees. Files are read with
`torch.load(weights_only=True)`, and weights that are not finite on any rank are never written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gvmrl.checkpoint import STATE_FILE, CheckpointError, _rng_state, _set_rng_state, read_state
from gvmrl.distributed.context import ProcessContext
from gvmrl.distributed.reduction import max_over_ranks
from gvmrl.distributed.sharding import full_state_dict
from gvmrl.guards import NonFiniteError, first_non_finite
from gvmrl.io import atomic_directory, recover_directory, remove_stale_temporaries

SHARDED_DIR = "sharded"
SCHEDULER_FILE = "scheduler.pt"


@contextlib.contextmanager
def shared_atomic_directory(path: str | Path, context: ProcessContext) -> Iterator[Path]:
    """`io.atomic_directory` for all ranks at once: rank 0 makes the temporary directory and
    every rank writes into it; after a barrier rank 0 renames it over `path`, and no rank leaves
    before the rename. An exception on rank 0 removes the temporary directory."""
    with contextlib.ExitStack() as stack:
        made = stack.enter_context(atomic_directory(path)) if context.is_main else None
        tmp = Path(context.broadcast_object(None if made is None else str(made)))
        yield tmp
        context.barrier()  # every rank has written its part
    context.barrier()  # rank 0 has renamed it


def find_sharded_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's latest complete sharded checkpoint, or None, for rank 0 alone: it repairs what a
    kill left (an interrupted rename, temporary directories) and checks the files."""
    checkpoints = Path(output_dir) / "checkpoints"
    path = checkpoints / "latest"
    recover_directory(path)
    remove_stale_temporaries(checkpoints, ["latest"])
    if not path.exists():
        return None
    read_state(path)
    for needed in (path / SHARDED_DIR / ".metadata", path / SCHEDULER_FILE):
        if not needed.is_file():
            raise CheckpointError(needed, "missing: the checkpoint is incomplete")
    return path


def _refuse_non_finite(model: torch.nn.Module, context: ProcessContext) -> None:
    """Raise NonFiniteError on every rank when any rank's shard holds a NaN or inf."""
    bad = first_non_finite(model)
    if max_over_ranks(int(bad is not None), context):
        where = f"parameter {bad}" if bad is not None else "a parameter on another rank"
        raise NonFiniteError(
            f"refusing to save a checkpoint: {where} is not finite (NaN or inf); "
            "the previous checkpoint is kept"
        )


def save_sharded_checkpoint(
    output_dir: str | Path,
    *,
    context: ProcessContext,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write the run's state as one unit (a collective: every rank calls it)."""
    _refuse_non_finite(model, context)
    path = Path(output_dir) / "checkpoints" / "latest"
    with shared_atomic_directory(path, context) as tmp:
        sharded = _state_to_save(model, optimizer)
        dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)
        torch.save(_rng_state(), tmp / f"rng-{context.rank}.pt")
        if context.is_main:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save({"scheduler": scheduler.state_dict()}, tmp / SCHEDULER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return path


def _state_to_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and, once it has taken a step, the optimizer's sharded state. Before the first
    step the optimizer is left out: `get_state_dict` would fill an empty optimizer's state by
    taking a zero step, and the AdamW step count it leaves would change every later update."""
    if not optimizer.state:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_checkpoint(
    checkpoint: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG in place (a collective); return
    the saved `state`. A rank without a saved RNG state (a larger world now) keeps its own."""
    checkpoint = Path(checkpoint)
    saved_keys = dcp.FileSystemReader(checkpoint / SHARDED_DIR).read_metadata().state_dict_metadata
    if any(key.startswith("optimizer.") for key in saved_keys):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint / SHARDED_DIR)
        set_state_dict(
            model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
        )
    else:  # saved before the first optimizer step: the optimizer stays fresh
        loaded = {"model": get_model_state_dict(model)}
        dcp.load(loaded, checkpoint_id=checkpoint / SHARDED_DIR)
        set_model_state_dict(model, loaded["model"])
    saved = torch.load(checkpoint / SCHEDULER_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(saved["scheduler"])
    rng = checkpoint / f"rng-{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return read_state(checkpoint)


def save_final(
    path: str | Path, *, context: ProcessContext, model: torch.nn.Module, tokenizer: Any
) -> None:
    """A plain Hugging Face checkpoint of the sharded `model`, written once, by rank 0."""
    from transformers import AutoModelForCausalLM

    weights = full_state_dict(model, main_only=True)
    if context.is_main:
        with atomic_directory(path) as tmp:
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(model.config)
            plain.load_state_dict(weights, assign=True)
            plain.tie_weights()
            plain.generation_config = model.generation_config
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    context.barrier()
