"""examples/slurm.sbatch under bash with Slurm's variables and stand-ins for scontrol and srun:
the torchrun command it launches on every node."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "examples" / "slurm.sbatch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        # `scontrol show hostnames LIST` expands the node list, one name per line
        "scontrol": 'printf "gpu-a17\\ngpu-b03\\n"',
        # srun records its command line and the environment the ranks would inherit
        "srun": 'echo "$@" > "$RECORD"; echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$RECORD"',
    }
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/bash\n{body}\n")
        stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(tmp_path / "srun.txt"),
        "SLURM_JOB_NODELIST": "gpu-a17,gpu-b03",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "64",
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_launches_one_torchrun_per_node_with_c10d_rendezvous_on_the_first_node(tmp_path):
    result = run_script(tmp_path, "configs/run.yaml", "/shared/runs/a")
    assert result.returncode == 0, result.stderr
    command, threads = (tmp_path / "srun.txt").read_text().splitlines()
    assert command.split() == [
        "--kill-on-bad-exit=1",
        "torchrun",
        *("--nnodes", "2", "--nproc-per-node", "8", "--rdzv-id", "4242"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a17:29500"),
        *("-m", "gvmrl", "train", "--config", "configs/run.yaml"),
        *("--output-dir", "/shared/runs/a"),
    ]
    assert threads == "OMP_NUM_THREADS=8"  # 64 CPUs shared by 8 ranks


def test_missing_arguments_stop_with_the_usage_line(tmp_path):
    result = run_script(tmp_path, "configs/run.yaml")
    assert result.returncode != 0
    assert "usage: sbatch examples/slurm.sbatch CONFIG OUTPUT_DIR" in result.stderr
    assert not (tmp_path / "srun.txt").exists()
