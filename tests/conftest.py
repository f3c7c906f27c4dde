"""Fixtures shared across test files: small real checkpoints built here, never downloaded.

`pytest` is the CPU suite on any machine: GPUs are hidden, so a config's `device: auto` and
every torchrun job the tests launch stay on the CPU, where their figures were derived.
`pytest --gpu` runs only the tests marked `gpu` (CUDA against the CPU, the real vLLM engine),
with the GPUs visible."""

from __future__ import annotations

import json
import os
import shutil

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--gpu", action="store_true", help="run only the tests marked gpu, with the GPUs visible"
    )


def pytest_configure(config):
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        others = [item for item in items if "gpu" not in item.keywords]
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if "gpu" in item.keywords]


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
