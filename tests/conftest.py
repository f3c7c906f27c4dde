"""Fixtures shared across test files: small real checkpoints built here, never downloaded."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture(scope="session")
def warm_checkpoint(tmp_path_factory):
    """A copy of the shipped built-in checkpoint (copied, so no test can change the package's)."""
    from gvmrl.builtin.model import builtin_checkpoint

    path = tmp_path_factory.mktemp("warm") / "checkpoint"
    shutil.copytree(builtin_checkpoint(), path)
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
