"""Checkpoints: refusal of non-finite weights, safe loading, and one clear error per bad file."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from gvmrl.checkpoint import (
    STATE_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    clear_run,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from gvmrl.guards import NonFiniteError
from gvmrl.io import InputError


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer

    tokenizer = builtin_tokenizer()
    config = builtin_model_config(tokenizer).to_dict()
    config.pop("layer_types")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config.from_dict({**config, "num_hidden_layers": 1}))
    return model, tokenizer


@pytest.fixture
def parts():
    model, tokenizer = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    return model, tokenizer, optimizer, scheduler


def save(run, parts, iteration):
    model, tokenizer, optimizer, scheduler = parts
    return save_checkpoint(
        run,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        state={"iteration": iteration, "samples_generated": 10 * iteration},
    )


def test_round_trip_restores_optimizer_and_every_rng(tmp_path, parts):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    path = save(tmp_path, parts, 2)
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())

    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    model, _, _, _ = parts
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert latest_checkpoint(tmp_path) == path
    state = load_trainer_state(path, optimizer, scheduler)
    assert state == {"iteration": 2, "samples_generated": 20}
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    saved_exp_avg = parts[2].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_exp_avg)
    assert scheduler.state_dict()["last_epoch"] == 1
    # plain tensors and primitives only: the strict loader reads it
    torch.load(path / TRAINER_STATE_FILE, weights_only=True)


def test_a_run_saved_with_two_gpus_resumes_with_one(tmp_path, parts, monkeypatch):
    """The CUDA generators of the GPUs both runs see come back; the saved second one is left."""
    states = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 8, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    path = save(tmp_path, parts, 1)
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append((i, state)))
    _, _, optimizer, scheduler = parts
    assert load_trainer_state(path, optimizer, scheduler)["iteration"] == 1
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], states[0])


def test_non_finite_weights_are_never_saved_and_the_last_checkpoint_stays(tmp_path, parts):
    path = save(tmp_path, parts, 1)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    model = parts[0]
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="embed_tokens.weight is not finite"):
        save(tmp_path, parts, 2)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest"]


def test_a_crafted_trainer_state_cannot_run_code(tmp_path, parts):
    path = save(tmp_path, parts, 1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Exploit()}, path / TRAINER_STATE_FILE)
    model, _, optimizer, scheduler = parts
    with pytest.raises(CheckpointError, match=f"{TRAINER_STATE_FILE}: cannot be loaded safely"):
        load_trainer_state(path, optimizer, scheduler)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what the strict loader refuses
        torch.load(path / TRAINER_STATE_FILE, weights_only=True)


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda p: (p / STATE_FILE).unlink(), STATE_FILE, "missing"),
        (lambda p: (p / STATE_FILE).write_text("{not json"), STATE_FILE, "not valid JSON"),
        (lambda p: (p / STATE_FILE).write_text('{"iteration": -1}'), STATE_FILE, "'iteration'"),
        (lambda p: _truncate(p / "model.safetensors"), "model.safetensors", "truncated"),
        (lambda p: _truncate(p / "model.safetensors", 0.0), "model.safetensors", "truncated"),
        (lambda p: _truncate(p / TRAINER_STATE_FILE), TRAINER_STATE_FILE, "truncated"),
        (lambda p: (p / "config.json").write_bytes(b"\xff"), "config.json", "not valid JSON"),
    ],
)
def test_a_damaged_checkpoint_names_the_file(tmp_path, parts, damage, file, message):
    path = save(tmp_path, parts, 3)
    damage(path)
    with pytest.raises(CheckpointError) as error:
        latest_checkpoint(tmp_path)
    text = str(error.value)
    assert text.startswith(f"{path / file}: ") and message in text and "--restart" in text
    assert isinstance(error.value, InputError)  # the CLI's exit-2 path


def test_metrics_without_a_checkpoint_refuse_a_silent_restart(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1}\n')  # killed during its first checkpoint save: fine
    assert latest_checkpoint(tmp_path) is None
    metrics.write_text('{"iteration": 1}\n{"iteration": 2}\n')
    with pytest.raises(CheckpointError, match="holds 2 logged iterations"):
        latest_checkpoint(tmp_path)
    clear_run(tmp_path)
    assert not metrics.exists() and latest_checkpoint(tmp_path) is None


def test_stale_temporary_directories_are_removed(tmp_path, parts):
    path = save(tmp_path, parts, 1)
    stale = [
        tmp_path / "checkpoints" / ".latest.abc123.tmp",
        tmp_path / ".final.def456.tmp",
    ]
    for directory in stale:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".config.yaml.x1.tmp").write_text("partial")
    keep = tmp_path / "notes.tmp"
    keep.write_text("the user's")
    assert latest_checkpoint(tmp_path) == path
    assert not any(d.exists() for d in stale)
    assert not (tmp_path / ".config.yaml.x1.tmp").exists() and keep.exists()


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, parts, monkeypatch):
    path = save(tmp_path, parts, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from (
            OSError(28, "No space left on device")
        )

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(InputError, match="no space left on device"):
        save(tmp_path, parts, 2)
    monkeypatch.undo()
    assert json.loads((path / STATE_FILE).read_text())["iteration"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest"]
