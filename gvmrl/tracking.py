"""Per-run metrics: an append-only, crash-safe metrics.jsonl plus TensorBoard and optional wandb.

metrics.jsonl is the record of truth: one JSON object per iteration, each line flushed and
fsynced as it is written, so a `kill -9` loses at most a torn last line. On resume the file is
cut back to the last checkpointed iteration (`truncate_metrics`), so after any number of kills
and resumes it holds each iteration exactly once. TensorBoard events are purged from the same
step for the same reason. Non-finite floats are written as `null` so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from gvmrl.io import InputError, atomic_open

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"  # lets a resumed run continue the same wandb run


class MetricsLogger:
    """Write one metrics row per step to output_dir/metrics.jsonl, TensorBoard and wandb.

    output_dir: the run directory. tensorboard: write event files under output_dir/tensorboard.
    wandb_project / wandb_run_name: log to Weights & Biases too (needs `pip install gvmrl[wandb]`).
    config: the resolved run config, recorded with the wandb run.
    resume_after: the last iteration the checkpoint holds; rows after it are dropped and the
    file is appended to. None starts a fresh metrics.jsonl, replacing any old one.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: dict | None = None,
        resume_after: int | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if resume_after is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resume_after)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote after the checkpoint it resumes from
            purge_step = None if resume_after is None else resume_after + 1
            log_dir = self.output_dir / "tensorboard"
            self._tensorboard = SummaryWriter(log_dir, purge_step=purge_step)
        self._wandb_run = None
        if wandb_project is not None:
            self._wandb_run = self._start_wandb(wandb_project, wandb_run_name, config, resume_after)

    def _start_wandb(
        self, project: str, name: str | None, config: dict | None, resume_after: int | None
    ) -> Any:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "logging to wandb needs the wandb package: pip install 'gvmrl[wandb]'"
            ) from None
        id_path = self.output_dir / WANDB_ID_FILE
        if resume_after is not None and id_path.is_file():
            run_id = id_path.read_text(encoding="utf-8").strip()
        else:
            run_id = wandb.util.generate_id()
            with atomic_open(id_path) as f:
                f.write(run_id + "\n")
        return wandb.init(
            project=project,
            name=name,
            config=config,
            id=run_id,
            resume="allow",
            dir=str(self.output_dir),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append `{"iteration": step, **metrics}` as one durable line; mirror scalars elsewhere.

        Values: numbers (Python, numpy or 0-dim tensors), strings, bools, None, and lists of
        numbers (TensorBoard shows those as histograms, e.g. samples per prompt).
        """
        if "iteration" in metrics and metrics["iteration"] != step:
            raise ValueError(f"metrics['iteration']={metrics['iteration']} differs from {step=}")
        row = {"iteration": step, **{key: _plain(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tensorboard is not None:
            self._write_tensorboard(row, step)
        if self._wandb_run is not None:
            self._wandb_run.log(row, step=step)

    def _write_tensorboard(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if key == "iteration" or value is None or isinstance(value, str):
                continue
            if isinstance(value, list):
                if value and all(isinstance(v, numbers.Real) for v in value):
                    self._tensorboard.add_histogram(key, np.asarray(value, dtype=np.float64), step)
            elif isinstance(value, numbers.Real):
                self._tensorboard.add_scalar(key, float(value), step)
        self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """JSON-ready copy of a metric value: tensors/numpy to Python numbers, NaN/inf to None."""
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays/scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file. A torn last line (no newline or bad JSON: a kill mid-write) is
    dropped; a bad line elsewhere means the file was damaged otherwise and raises InputError."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn_tail = lines.pop()  # "" when the file ends with a newline
    rows = []
    for line_no, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if line_no == len(lines) and not torn_tail:
                # the last complete-looking line is torn only if nothing follows it
                break
            raise InputError(path, line_no, f"invalid JSON in metrics file: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise InputError(path, line_no, "expected a JSON object with an integer 'iteration'")
        rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl in file order; a torn last line is ignored, so a file being
    written by a live run can be read at any moment."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    return _parse_lines(path)


def truncate_metrics(path: str | os.PathLike, keep_through_step: int) -> None:
    """Keep only rows with iteration <= keep_through_step (and no torn last line), atomically.

    Called on resume with the checkpoint's last finished iteration: rows the killed run wrote
    after that checkpoint are logged again by the resumed run, so dropping them here keeps each
    iteration exactly once. A missing file is left missing.
    """
    path = Path(path)
    if not path.is_file():
        return
    rows = [row for row in _parse_lines(path) if row["iteration"] <= keep_through_step]
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
