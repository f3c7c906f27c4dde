"""kill -9 during `gvmrl train` (at a random moment before its first checkpoint, at one inside
its second iteration, and the moment its second checkpoint appears), then rerun: the rerun
resumes from the checkpoint the kill left, reaches the same final weights as an uninterrupted
run, and leaves no temporary file or directory behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ITERATIONS = 4  # the last kill (at checkpoint 2) leaves two iterations of margin: ~0.7 s here
SETTINGS = [
    "prompts_per_iteration=4",
    "samples_per_prompt=2",
    f"iterations={ITERATIONS}",
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


def _checkpoint_iteration(run_dir):
    """The iteration of the checkpoint a resume would load, 0 for none: checkpoints/latest, or
    latest.old where a kill fell between the two renames of a save (gvmrl.io.atomic_directory).
    In a live run, a read that races a save's renames may give 0 too."""
    for name in ("latest", "latest.old"):
        try:
            return json.loads((run_dir / "checkpoints" / name / "state.json").read_text())[
                "iteration"
            ]
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue
    return 0


def _wait_for_checkpoint(run_dir, proc, iteration, timeout=300.0):
    """Until the live run has saved the checkpoint of `iteration` (0: at once)."""
    deadline = time.monotonic() + timeout
    while _checkpoint_iteration(run_dir) < iteration:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {iteration=}"
        assert time.monotonic() < deadline, f"no checkpoint of {iteration=}"
        time.sleep(0.01)


def _metric_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _leftovers(directory):
    return sorted(str(p) for p in directory.rglob("*") if p.name.endswith((".tmp", ".old")))


@pytest.mark.slow
def test_random_kills_resume_to_the_same_weights(tmp_path, warm_checkpoint, easy_prompts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    proc = subprocess.Popen(_command(warm_checkpoint, easy_prompts, whole), env=env)
    _wait_for_start(whole)
    started = time.monotonic()
    saved_at = {}  # iteration -> seconds from the trainer's start until its checkpoint was saved
    while proc.poll() is None:
        iteration = _checkpoint_iteration(whole)
        if iteration and iteration not in saved_at:
            saved_at[iteration] = time.monotonic() - started
        assert time.monotonic() - started < 300, "the uninterrupted run took too long"
        time.sleep(0.01)
    assert proc.returncode == 0
    assert sorted(saved_at) == list(range(1, ITERATIONS + 1))
    expected = load_file(whole / "final" / "model.safetensors")

    # (checkpoint to wait for, then a kill at a random share of this stretch of the run): before
    # the first save (the end of loading, iteration 1, its save); inside iteration 2 (its first
    # half); as soon as checkpoint 2 appears (its save's clean-up, the start of iteration 3). An
    # iteration takes under a second here, so a kill near the end could find the run already
    # finished; these always find it alive and two of them leave a checkpoint to resume.
    plans = [(0, 0.9 * saved_at[1]), (1, 0.5 * (saved_at[2] - saved_at[1])), (2, 0.0)]
    resumed_from = []
    for seed, (after, stretch) in enumerate(plans):
        run = tmp_path / f"killed-{seed}"
        delay = random.Random(seed).uniform(0.0, 1.0) * stretch
        proc = subprocess.Popen(
            _command(warm_checkpoint, easy_prompts, run),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_start(run)  # kill inside training (or its saves), not during the imports
        _wait_for_checkpoint(run, proc, after)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        where = f"seed {seed}, killed {delay:.1f}s after checkpoint {after}"
        assert proc.returncode == -signal.SIGKILL, f"{where}: the run was not alive"
        at_kill = _checkpoint_iteration(run)
        assert after <= at_kill, where
        kept = _metric_lines(run)[:at_kill]  # the rows of the checkpointed iterations
        assert [json.loads(line)["iteration"] for line in kept] == list(range(1, at_kill + 1))

        rerun = subprocess.run(
            _command(warm_checkpoint, easy_prompts, run),
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert rerun.returncode == 0, f"{where}: {rerun.stderr[-2000:]}"
        # the rerun trained only the iterations after the checkpoint (one summary line each)
        summaries = [line.split() for line in rerun.stderr.splitlines()]
        trained = [int(words[1]) for words in summaries if words[:1] == ["iter"]]
        assert trained == list(range(at_kill + 1, ITERATIONS + 1)), f"{where}, checkpoint {at_kill}"
        lines = _metric_lines(run)
        logged = [json.loads(line)["iteration"] for line in lines]
        assert logged == list(range(1, ITERATIONS + 1)), where
        assert lines[:at_kill] == kept, where  # the killed run's own rows, not rewritten
        assert _leftovers(run) == [], where
        got = load_file(run / "final" / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), where
        resumed_from.append(at_kill)
    # at least one kill fell mid-run with a checkpoint to resume from, before the last one
    assert any(1 <= k < ITERATIONS for k in resumed_from), resumed_from
