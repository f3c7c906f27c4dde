"""`gvmrl demo`, the README's main command, end to end at a tiny size."""

from __future__ import annotations

import json
import shutil

from gvmrl.cli import main
from gvmrl.builtin.model import BUILTIN_VERSION


def test_demo_writes_the_comparison(tmp_path, monkeypatch, capsys, warm_checkpoint, easy_prompts):
    # The demo asks for the cached built-in model; a short warm start stands in for it.
    monkeypatch.setenv("GVMRL_CACHE", str(tmp_path / "cache"))
    shutil.copytree(warm_checkpoint, tmp_path / "cache" / BUILTIN_VERSION)
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--iterations", "2", "--prompts", "8"]
    for override in (
        f"train_data={easy_prompts}",
        "rollout.max_new_tokens=40",
        "data.eval_limit=8",
        "eval.samples=1",
        "logging.progress=false",
        "threads=1",
    ):
        argv += ["--set", override]
    assert main(argv) == 0

    summary = json.loads((out / "summary.json").read_text())
    runs = {row["method"]: row for row in summary["runs"]}
    assert list(runs) == ["uniform", "gvm", "gvm-inclusive"]
    # Per iteration of 8 prompts: uniform draws 8 samples each; gvm 8 pre-samples each and then
    # its budget of 8 x 8; budget-inclusive gvm 4 pre-samples each and 4 x 8, i.e. what uniform
    # generates. With 8 prompts (not 4) some pre-sample is accepted in every iteration of both
    # arms, so every budget is spent.
    assert runs["uniform"]["samples_generated"] == 2 * 8 * 8
    for arm, presamples, budget in (("gvm", 64, 64), ("gvm-inclusive", 32, 32)):
        rows = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["iteration"] > 0]
        assert all(r["accept_rate_mean"] > 0 for r in rows)
        assert [r["presamples"] for r in rows] == [presamples, presamples]
        assert [r["samples"] for r in rows] == [budget, budget]
        assert runs[arm]["samples_generated"] == 2 * (presamples + budget)
    assert runs["gvm-inclusive"]["samples_generated"] == runs["uniform"]["samples_generated"]
    assert all(row["iterations"] == 2 for row in runs.values())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.txt").read_text()
    assert "Target accuracy" in table and "gvm-inclusive" in table
    assert table.split("\n\n", 1)[1].strip() in capsys.readouterr().out
    for arm in runs:  # each run keeps its own config and metrics beside its outputs
        assert (out / arm / "config.yaml").is_file() and (out / arm / "metrics.jsonl").is_file()
