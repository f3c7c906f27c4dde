"""Resumable training checkpoints, written atomically.

DIR/checkpoints/latest is a plain Hugging Face checkpoint (model + tokenizer, loadable with
`from_pretrained`) plus `trainer_state.pt` (optimizer, scheduler, RNG states) and `state.json`
(the iteration it finished, counters, data position). The directory is built under a temporary
name and renamed into place, so a `kill -9` at any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gvmrl.io import atomic_directory, recover_directory

STATE_FILE = "state.json"
TRAINER_STATE_FILE = "trainer_state.pt"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None before the first one."""
    path = Path(output_dir) / "checkpoints" / "latest"
    recover_directory(path)
    return path if (path / STATE_FILE).is_file() else None


def save_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write model, tokenizer, optimizer/scheduler/RNG states and `state` as one unit."""
    path = Path(output_dir) / "checkpoints" / "latest"
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            },
            tmp / TRAINER_STATE_FILE,
        )
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return path


def load_trainer_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states in place; return the saved `state` dict."""
    saved = torch.load(checkpoint / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return json.loads((checkpoint / STATE_FILE).read_text())
