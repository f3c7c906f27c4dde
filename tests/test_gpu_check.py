"""scripts/gpu_check.py runs end to end at tiny sizes on CPU (the device run uses full sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_its_figures(tmp_path):
    output = tmp_path / "check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--smoke",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    norms = report["grad_norms"]
    assert norms["max_relative_difference"] < 0.02  # batched bf16 norms agree with the loop
    iteration = report["iteration"]
    assert {"time_presample", "time_sample", "time_update"} <= set(iteration["phase_seconds"])
    assert iteration["samples"] > 0 and iteration["plan_update_peak_gib"] > 0
    master = report["master_weights"]
    assert master["fp32_master_bf16_compute"] > 0.99 and master["bf16_weights"] < 0.1
    job = report["job"]  # on CPU (gloo, fp32) the one-process job trains exactly as plain
    assert job["plain"]["world_size"] == job["torchrun"]["world_size"] == 1
    assert job["same_tokens_generated"] and job["final_weights_max_abs_difference"] < 1e-6


def test_gpu_check_without_a_gpu_stops_at_once(tmp_path):
    """The full sizes on a CPU would take hours: one line and exit status 2 instead (the suite
    hides any GPU: tests/conftest.py)."""
    output = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "sees no GPU" in result.stderr and "--smoke" in result.stderr
    assert not output.exists()
