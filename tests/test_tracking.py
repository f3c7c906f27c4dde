"""Metrics logging (jsonl, TensorBoard, wandb), resume truncation, and progress display."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import torch

from gvmrl.io import InputError
from gvmrl.progress import Progress, format_table
from gvmrl.tracking import MetricsLogger, read_metrics, truncate_metrics

# ---------------------------------------------------------------------------------- metrics.jsonl


def test_log_writes_one_strict_json_line_per_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"loss": torch.tensor(0.5), "acc": np.float32(0.25), "name": "x"}, step=0)
        logger.log({"loss": float("nan"), "samples_per_prompt": np.array([1, 3])}, step=1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"iteration": 0, "loss": 0.5, "acc": 0.25, "name": "x"},
        {"iteration": 1, "loss": None, "samples_per_prompt": [1, 3]},  # NaN -> null
    ]
    assert "NaN" not in lines[1]
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["samples_per_prompt"] == [1, 3]


def test_line_is_durable_before_close(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"loss": 1.0}, step=0)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"iteration": 0, "loss": 1.0}]
    logger.close()
    logger.close()  # idempotent


def test_conflicting_iteration_key_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="differs from step"):
            logger.log({"iteration": 3}, step=4)


def _write(path, text):
    path.write_text(text, encoding="utf-8")


def test_truncate_drops_later_rows_and_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"iteration": i, "loss": i / 10}) + "\n" for i in range(5))
    _write(path, rows + '{"iteration": 5, "lo')  # killed mid-write
    assert [r["iteration"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    truncate_metrics(path, keep_through_step=2)
    assert path.read_text() == "".join(rows.splitlines(keepends=True)[:3])
    truncate_metrics(tmp_path / "missing.jsonl", 3)
    assert not (tmp_path / "missing.jsonl").exists()


def test_damaged_middle_line_is_an_input_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, '{"iteration": 0}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(InputError) as err:
        read_metrics(path)
    assert err.value.line == 2
    _write(path, '{"iteration": "zero"}\n')
    with pytest.raises(InputError, match="integer 'iteration'"):
        truncate_metrics(path, 3)
    with pytest.raises(InputError, match="file not found"):
        read_metrics(tmp_path / "nope.jsonl")


def test_fresh_run_replaces_and_resume_appends(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(4):
            logger.log({"loss": step}, step=step)
    with MetricsLogger(tmp_path, tensorboard=False, resume_after=1) as logger:
        logger.log({"loss": 20}, step=2)
    assert [(r["iteration"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (0, 0), (1, 1), (2, 20)
    ]  # fmt: skip
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"loss": 7}, step=0)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"iteration": 0, "loss": 7}]


_LOGGING_CHILD = textwrap.dedent(
    """
    import sys, time
    from gvmrl.tracking import MetricsLogger
    logger = MetricsLogger(sys.argv[1], tensorboard=False)
    step = 0
    while True:
        logger.log({"loss": step * 0.5, "pad": "x" * 2000}, step=step)
        step += 1
        time.sleep(0.01)
    """
)


def test_kill_9_then_resume_holds_each_iteration_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _LOGGING_CHILD, str(tmp_path)])
    path = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().count("\n") >= 6:
                break
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    written = read_metrics(path)
    assert len(written) >= 6
    # the checkpoint holds iteration 3; the resumed run logs 4.. again
    with MetricsLogger(tmp_path, tensorboard=False, resume_after=3) as logger:
        for step in range(4, 8):
            logger.log({"loss": step * 0.5, "pad": "y"}, step=step)
    rows = read_metrics(path)
    assert [r["iteration"] for r in rows] == list(range(8))
    assert [r["pad"][0] for r in rows] == ["x"] * 4 + ["y"] * 4


# ----------------------------------------------------------------------------------- TensorBoard


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["histograms"]


def test_tensorboard_scalars_histograms_and_resume_purge(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(3):
            logger.log({"loss": step + 0.5, "note": "s", "samples_per_prompt": [1, 2, 5]}, step)
    with MetricsLogger(tmp_path, resume_after=0) as logger:
        logger.log({"loss": 9.0}, step=1)
    scalars, histograms = _tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss"}  # strings and the iteration key are not scalars
    # steps 1-2 of the first run are purged by the resumed writer
    assert scalars["loss"] == [(0, 0.5), (1, 9.0)]
    assert histograms == ["samples_per_prompt"]


# ---------------------------------------------------------------------------------------- wandb


class _FakeWandb(types.ModuleType):
    """Records wandb.init/log/finish calls; the real package is an optional extra."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []
        self.util = types.SimpleNamespace(generate_id=lambda: f"run{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(
            log=lambda row, step: self.logged.append((step, row)), finish=lambda: None
        )


def test_wandb_logs_and_resumes_same_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    kwargs = dict(tensorboard=False, wandb_project="p", wandb_run_name="r", config={"seed": 1})
    with MetricsLogger(tmp_path, **kwargs) as logger:
        logger.log({"loss": 1.0}, step=0)
    with MetricsLogger(tmp_path, resume_after=0, **kwargs) as logger:
        logger.log({"loss": 2.0}, step=1)
    assert [init["id"] for init in fake.inits] == ["run0", "run0"]
    assert fake.inits[0]["config"] == {"seed": 1} and fake.inits[0]["project"] == "p"
    assert fake.logged == [(0, {"iteration": 0, "loss": 1.0}), (1, {"iteration": 1, "loss": 2.0})]


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"gvmrl\[wandb\]"):
        MetricsLogger(tmp_path, tensorboard=False, wandb_project="p")


# ------------------------------------------------------------------------------------- progress


def test_plain_progress_writes_one_line_per_phase_and_log_lines():
    stream = io.StringIO()
    with Progress(enabled=False, stream=stream) as progress:
        task = progress.phase("sample", total=512)
        progress.advance(task, 500)
        progress.advance(task, 12)
        progress.end(task)
        progress.log("iter 3: acc=0.41")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("sample: 512/512 in ") and lines[0].endswith("s")
    assert lines[1] == "iter 3: acc=0.41"


def test_auto_mode_is_plain_off_a_tty():
    stream = io.StringIO()  # not a TTY
    with Progress(stream=stream) as progress:
        progress.end(progress.phase("train", total=None))
    assert stream.getvalue().startswith("train: 0 in ")


def test_rich_progress_logs_phase_summaries():
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream) as progress:
        task = progress.phase("grade", total=4)
        progress.advance(task, 4)
        progress.end(task)
        progress.log("done here")
    text = stream.getvalue()
    assert "grade: 4/4 in" in text and "done here" in text


def test_format_table_aligns_columns_and_formats_numbers():
    rows = [
        {"arm": "uniform", "accuracy": 0.41234, "samples": 4096},
        {"arm": "gvm", "accuracy": float("nan"), "samples": 512, "extra": 1},
    ]
    table = format_table(rows, ["arm", "accuracy", "samples", "missing"])
    assert table.splitlines() == [
        "arm      accuracy  samples  missing",
        "-------  --------  -------  -------",
        "uniform    0.4123     4096        -",
        "gvm           nan      512        -",
    ]
    assert math.isnan(rows[1]["accuracy"])  # input untouched
