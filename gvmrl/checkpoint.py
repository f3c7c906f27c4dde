"""Resumable training checkpoints, written atomically and loaded without running code.

DIR/checkpoints/latest is a plain Hugging Face checkpoint (model + tokenizer, loadable with
`from_pretrained`) plus `trainer_state.pt` (optimizer, scheduler, RNG states) and `state.json`
(the iteration it finished, counters, data position). The directory is built under a temporary
name and renamed into place, so a `kill -9` at any moment leaves the previous complete checkpoint;
the temporary directory such a kill leaves is removed at the next start.

trainer_state.pt holds only tensors, numbers, strings and containers of them (numpy and Python
RNG states are converted), so it is read with `torch.load(weights_only=True)`: a crafted file in
an output directory cannot execute code. A checkpoint that is incomplete or corrupt fails with one
message naming the file, never a silent restart from iteration 0; a checkpoint whose weights are
not finite is never written.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gvmrl.guards import NonFiniteError, first_non_finite
from gvmrl.io import InputError, atomic_directory, recover_directory, remove_stale_temporaries

STATE_FILE = "state.json"
TRAINER_STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
# What a run writes under its output directory; `clear_run` removes these to start over.
RUN_OUTPUTS = ("checkpoints", "final", METRICS_FILE, "tensorboard", "wandb_run_id.txt")
RESTART_HINT = "rerun with --restart to start the run over (deletes its checkpoints and metrics)"


class CheckpointError(InputError):
    """A checkpoint file that is missing, truncated or not a gvmrl checkpoint (a user error)."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(path, None, f"{message}; {RESTART_HINT}")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None before the first one.

    Removes the temporary directories a killed save left, and checks the checkpoint's files
    (CheckpointError naming the first bad one). Raises CheckpointError too when the directory
    holds metrics of more than one iteration but no checkpoint: resuming is impossible and
    starting over would delete them, so the caller must ask for that (`clear_run`).
    """
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    path = checkpoints / "latest"
    recover_directory(path)
    recover_directory(output_dir / "final")
    remove_stale_temporaries(checkpoints, ["latest"])
    remove_stale_temporaries(output_dir, ["final", "config.yaml", METRICS_FILE])
    if not path.exists():
        _refuse_silent_restart(output_dir)
        return None
    verify_checkpoint(path)
    return path


def clear_run(output_dir: str | Path) -> None:
    """Delete a run's checkpoints, final weights and metrics, so the next start begins anew."""
    for name in RUN_OUTPUTS:
        target = Path(output_dir) / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _refuse_silent_restart(output_dir: Path) -> None:
    """Metrics are logged just before each checkpoint is saved, so without any checkpoint the
    file can hold at most the one row of a run killed during its first save."""
    metrics = output_dir / METRICS_FILE
    if not metrics.is_file():
        return
    with metrics.open("rb") as f:
        rows = sum(1 for line in f if line.strip())
    if rows > 1:
        raise CheckpointError(
            metrics,
            f"holds {rows} logged iterations but {output_dir / 'checkpoints' / 'latest'} is "
            "missing, so the run cannot resume",
        )


def verify_checkpoint(path: Path) -> None:
    """Check every file a resume reads, cheaply: state.json parses, trainer_state.pt and each
    safetensors file are complete (a truncated file fails here, not deep inside a loader)."""
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    read_state(path)
    for name in ("config.json",):
        _read_json(path / name)
    trainer_state = path / TRAINER_STATE_FILE
    if not trainer_state.is_file():
        raise CheckpointError(trainer_state, "missing: the checkpoint is incomplete")
    if not zipfile.is_zipfile(trainer_state):
        raise CheckpointError(trainer_state, "truncated or not a torch checkpoint")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        weights = [path / shard for shard in shards]
    else:
        weights = [path / "model.safetensors"]
    for file in weights:
        _check_safetensors(file)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's state.json: a JSON object with a non-negative integer `iteration`."""
    state = _read_json(checkpoint / STATE_FILE)
    iteration = state.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(
            checkpoint / STATE_FILE, f"'iteration' must be an integer >= 0, got {iteration!r}"
        )
    return state


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "missing: the checkpoint is incomplete")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "expected a JSON object")
    return value


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the
    header's largest end offset says; a shorter file was cut off."""
    if not path.is_file():
        raise CheckpointError(path, "missing: the checkpoint has no model weights")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise CheckpointError(path, f"truncated ({size} bytes): no complete header")
        try:
            header = json.loads(f.read(header_len))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(path, f"not a safetensors file ({e})") from None
    if size != 8 + header_len + end:
        raise CheckpointError(
            path, f"truncated: {size} bytes, the header describes {8 + header_len + end}"
        )


def save_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write model, tokenizer, optimizer/scheduler/RNG states and `state` as one unit.

    Raises NonFiniteError, writing nothing, when a weight is NaN or infinite: the previous
    checkpoint stays the latest. A full disk raises InputError saying so; the previous
    checkpoint is kept then too.
    """
    bad = first_non_finite(model)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to save a checkpoint: parameter {bad} is not finite (NaN or inf); "
            f"the previous checkpoint in {Path(output_dir) / 'checkpoints'} is kept"
        )
    path = Path(output_dir) / "checkpoints" / "latest"
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        }
        with open(tmp / TRAINER_STATE_FILE, "wb") as f:  # a file object: ENOSPC stays visible
            torch.save(trainer_state, f)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return path


def _rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain lists (weights_only-loadable)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        # the GPUs both runs see: a run resumed with fewer visible GPUs restores theirs only
        for index, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    n = rng["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["position"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def load_trainer_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states in place; return the saved `state` dict.

    Loaded with `weights_only=True`; a file that needs more (an older gvmrl's, or a crafted one)
    or does not fit the optimizer raises CheckpointError naming it.
    """
    file = checkpoint / TRAINER_STATE_FILE
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(file, f"cannot be loaded safely: {first_line}") from None
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(file, f"does not match this run ({type(e).__name__}: {e})") from None
    return read_state(checkpoint)
