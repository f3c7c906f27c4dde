"""Fixtures shared across test files: small real checkpoints built here, never downloaded."""

from __future__ import annotations

import json

import pytest

WARM_STEPS = 300  # enough supervised steps for the built-in model to solve short chains sometimes


@pytest.fixture(scope="session")
def warm_checkpoint(tmp_path_factory):
    """The built-in tiny model after a short supervised warm start (about a minute on 2 cores)."""
    from gvmrl.builtin.pretrain import pretrain

    path = tmp_path_factory.mktemp("warm") / "checkpoint"
    # Annealed to lr 0: in a run this short that is what makes short chains come out right (the
    # built-in model keeps a floor instead because RL continues from it).
    pretrain(path, steps=WARM_STEPS, min_lr_ratio=0.0, seed=0, progress=False)
    return path


@pytest.fixture(scope="session")
def easy_prompts(tmp_path_factory):
    """Built-in train problems of one or two steps, where a briefly trained model is often right."""
    from gvmrl.builtin.task import builtin_problems

    path = tmp_path_factory.mktemp("data") / "easy.jsonl"
    rows = [
        {"id": f"easy-{i}", "problem": p.problem, "answer": p.answer}
        for i, p in enumerate(builtin_problems("default", "train"))
        if p.steps <= 2
    ][:256]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
