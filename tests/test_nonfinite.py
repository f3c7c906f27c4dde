"""The non-finite guard wired into training: a diverged run stops with one line and exit 2 and
keeps its last good checkpoint; a NaN reward costs a skipped (counted) step, not the run."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from gvmrl.builtin.model import builtin_checkpoint
from gvmrl.cli import main
from gvmrl.config import load_config
from gvmrl.rewards import REWARDS
from gvmrl.tracking import read_metrics
from gvmrl.train import Trainer

PROMPTS = 8
SAMPLES = 2


def tiny_run(*extra: str) -> list[str]:
    """The built-in model on 8 built-in prompts x 2 short samples, 4 optimizer steps an
    iteration (mini-batches of 2 prompts): one more than the default max_skipped_steps of 3."""
    return [
        "model=builtin",
        "train_data=builtin:train",
        "eval_data=builtin:test",
        "data.eval_limit=4",
        f"prompts_per_iteration={PROMPTS}",
        f"samples_per_prompt={SAMPLES}",
        "rollout.max_new_tokens=24",
        "eval.samples=1",
        "update.minibatch_size=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "threads=1",
        *extra,
    ]


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_lr_1e30_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    # Every sample rewarded, so RAFT++ trains on all of them and each of the 4 steps has a
    # gradient. Step 1 at lr 1e30 is finite (AdamW moves each weight by ~1e30) but makes every
    # later loss NaN: steps 2-4 are skipped and the third skip in a row stops the run during
    # iteration 1. The checkpoint of iteration 0 (saved with the evaluation before training)
    # must survive, untouched.
    monkeypatch.setitem(REWARDS, "answer", lambda grade, text: 1.0)
    args = ["train", "--output-dir", str(tmp_path)]
    for override in tiny_run("iterations=2", "eval.every=1", "optim.lr=1e30"):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    progress = [line for line in err.splitlines() if line.startswith("iter ")]
    assert progress == [line for line in err.splitlines() if line.startswith("iter 0 ")]
    [message] = [line for line in err.splitlines() if line.strip() and line not in progress]
    assert message.startswith("gvmrl train: 3 optimizer steps in a row had a non-finite loss")
    assert "optim.max_skipped_steps=3" in message
    latest = tmp_path / "checkpoints" / "latest"
    assert json.loads((latest / "state.json").read_text())["iteration"] == 0
    saved = load_file(latest / "model.safetensors")
    initial = load_file(builtin_checkpoint() / "model.safetensors")
    assert _all_finite(saved)
    assert saved.keys() == initial.keys()
    for name in saved:  # the untouched initial policy, not the diverged one
        torch.testing.assert_close(saved[name], initial[name], rtol=0, atol=0)
    assert not (tmp_path / "final").exists()


def test_nan_reward_steps_are_skipped_counted_and_survive_a_resume(tmp_path, monkeypatch):
    # Dr. GRPO centres rewards within a prompt's group, so one NaN reward makes that group's
    # advantages, its mini-batch's loss and gradient NaN: exactly one of the 4 steps of each
    # iteration is skipped (the first sample of every iteration's sampling call). (RAFT/RAFT++
    # never train on a NaN-reward sample, which is not accepted, and GRPO with the std gives
    # its group advantage 0: for them such a reward never reaches the loss.)
    calls = {"n": 0}

    def nan_for_the_first_sample(grade, text):
        """NaN for the first sample of each iteration, else 1, 0, 1, 0, ...: every other group
        has one right and one wrong sample, so the applied steps have a gradient."""
        calls["n"] += 1
        return math.nan if calls["n"] % (PROMPTS * SAMPLES) == 1 else float(calls["n"] % 2)

    monkeypatch.setitem(REWARDS, "answer", nan_for_the_first_sample)
    common = ["algorithm=grpo", "loss.grpo_scale_by_std=false", "eval_data=null"]
    first = Trainer(load_config(None, tiny_run(*common, "iterations=1")), tmp_path).run()
    assert first["skipped_steps"] == 1 and first["optimizer_steps"] == 3
    assert first["total_skipped_steps"] == 1
    assert math.isfinite(first["loss"]) and math.isfinite(first["grad_norm"])
    # resumed: the total comes back from the checkpoint's state
    last = Trainer(load_config(None, tiny_run(*common, "iterations=2")), tmp_path).run()
    assert last["skipped_steps"] == 1 and last["optimizer_steps"] == 3
    assert last["total_skipped_steps"] == 2 and last["total_optimizer_steps"] == 6
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [1, 1]
    state = json.loads((tmp_path / "checkpoints" / "latest" / "state.json").read_text())
    assert state["skipped_steps"] == 2 and state["optimizer_steps"] == 6
    final = load_file(tmp_path / "final" / "model.safetensors")
    initial = load_file(builtin_checkpoint() / "model.safetensors")
    assert _all_finite(final)
    assert any(not torch.equal(final[k], initial[k]) for k in final)  # the applied steps trained
