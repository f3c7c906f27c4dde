"""bench/allocators.py: grid processes sharing one output directory claim runs exclusively."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from allocators import claim  # noqa: E402  (bench/ holds scripts, not a package)


def test_a_run_claimed_by_a_live_process_is_skipped(tmp_path):
    run = tmp_path / "runs" / "grpo" / "dapo" / "seed0"
    assert claim(run)
    assert (run / "claimed-by").read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not claim(run)  # held by this (live) process


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "claimed-by").write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    assert claim(run)
    assert (run / "claimed-by").read_text() == f"{socket.gethostname()} {os.getpid()}"


def test_a_claim_from_another_host_is_respected(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "claimed-by").write_text("some-other-host 1")
    assert not claim(run)
