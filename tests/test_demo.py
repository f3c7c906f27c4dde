"""`gvmrl demo`, the README's main command, end to end at a tiny size."""

from __future__ import annotations

import json
import shutil

from gvmrl.cli import main
from gvmrl.models import BUILTIN_VERSION


def test_demo_writes_the_comparison(tmp_path, monkeypatch, capsys, warm_checkpoint, easy_prompts):
    # The demo asks for the cached built-in model; a short warm start stands in for it.
    monkeypatch.setenv("GVMRL_CACHE", str(tmp_path / "cache"))
    shutil.copytree(warm_checkpoint, tmp_path / "cache" / BUILTIN_VERSION)
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--iterations", "2", "--prompts", "4"]
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
    # Per iteration of 4 prompts: uniform draws 8 samples each; gvm 8 pre-samples each and then
    # its budget of 8 x 4; budget-inclusive gvm 4 pre-samples each and 4 x 4, i.e. what uniform
    # generates. A budget is only spent when some pre-sample was accepted.
    assert runs["uniform"]["samples_generated"] == 2 * 4 * 8
    for arm, presamples, budget in (("gvm", 32, 32), ("gvm-inclusive", 16, 16)):
        rows = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["iteration"] > 0]
        assert [r["presamples"] for r in rows] == [presamples, presamples]
        assert all(r["samples"] in (0, budget) for r in rows)
        assert runs[arm]["samples_generated"] == sum(r["presamples"] + r["samples"] for r in rows)
    assert all(row["iterations"] == 2 for row in runs.values())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.txt").read_text()
    assert "Target accuracy" in table and "gvm-inclusive" in table
    assert table.split("\n\n", 1)[1].strip() in capsys.readouterr().out
    for arm in runs:  # each run keeps its own config and metrics beside its outputs
        assert (out / arm / "config.yaml").is_file() and (out / arm / "metrics.jsonl").is_file()
