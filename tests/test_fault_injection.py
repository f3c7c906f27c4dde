"""kill -9 at random moments of `gvmrl train`, then rerun: the same final weights as an
uninterrupted run, and no temporary file or directory left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

SETTINGS = [
    "prompts_per_iteration=4",
    "samples_per_prompt=2",
    "iterations=3",
    "eval.every=0",
    "threads=1",
    "rollout.max_new_tokens=24",
    "update.minibatch_size=2",
    "logging.progress=false",
    "logging.tensorboard=false",
    "data.instruction=null",
]


def _command(checkpoint, data, output_dir):
    sets = [f"model={checkpoint}", f"train_data={data}", "eval_data=null", *SETTINGS]
    return [
        *(sys.executable, "-m", "gvmrl", "train", "--output-dir", str(output_dir)),
        *(a for s in sets for a in ("--set", s)),
    ]


def _wait_for_start(run_dir, timeout=300.0):
    """Until the trainer has written the run's config.yaml (imports done, model loading)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "config.yaml").exists():
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.02)


def _leftovers(directory):
    return sorted(str(p) for p in directory.rglob("*") if p.name.endswith((".tmp", ".old")))


@pytest.mark.slow
def test_random_kills_resume_to_the_same_weights(tmp_path, warm_checkpoint, easy_prompts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    proc = subprocess.Popen(_command(warm_checkpoint, easy_prompts, whole), env=env)
    _wait_for_start(whole)
    started = time.monotonic()
    assert proc.wait(timeout=300) == 0
    duration = time.monotonic() - started  # from the trainer's start to the end
    expected = load_file(whole / "final" / "model.safetensors")

    for seed in range(3):
        run = tmp_path / f"killed-{seed}"
        delay = random.Random(seed).uniform(0.0, 1.0) * duration
        proc = subprocess.Popen(
            _command(warm_checkpoint, easy_prompts, run),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_start(run)  # kill inside training (or its saves), not during the imports
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rerun = _command(warm_checkpoint, easy_prompts, run)
        subprocess.run(rerun, check=True, env=env, timeout=300)
        assert _leftovers(run) == [], f"seed {seed}, killed after {delay:.1f}s"
        got = load_file(run / "final" / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), f"seed {seed}"
