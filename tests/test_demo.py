"""`gvmrl demo`, the README's main command: end to end at a tiny size, and its verdict sentence."""

from __future__ import annotations

import json
import math

import pytest

from gvmrl.cli import main
from gvmrl.commands.demo import ArmSummary, verdict

TINY = [
    "rollout.max_new_tokens=40",
    "data.eval_limit=8",
    "eval.samples=2",
    "eval.every=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "threads=1",
]


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_compares_the_arms_over_seeds(tmp_path, capsys, easy_prompts):
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--iterations", "2", "--prompts", "8"]
    argv += ["--seeds", "2"]
    for override in (f"train_data={easy_prompts}", *TINY):
        argv += ["--set", override]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    runs = {row["arm"]: row for row in summary["runs"]}
    assert list(runs) == ["uniform", "gvm"]
    # Per iteration of 8 prompts: uniform draws 8 samples each; gvm 8 pre-samples each and then
    # its budget of 8 x 8 (spent: on these easy prompts some pre-sample is always accepted).
    assert runs["uniform"]["samples_generated"] == 2 * 8 * 8
    assert runs["gvm"]["samples_generated"] == 2 * (64 + 64)
    finals = {}
    for arm, row in runs.items():
        assert row["seeds"] == [0, 1]
        seed_rows = [_metrics(out / arm / f"seed{s}" / "metrics.jsonl") for s in (0, 1)]
        assert [[r["iteration"] for r in m if "eval_accuracy" in r] for m in seed_rows] == [
            [0, 1, 2]
        ] * 2
        finals[arm] = [m[-1]["eval_accuracy"] for m in seed_rows]
        assert row["final_accuracy"] == pytest.approx(sum(finals[arm]) / 2)
        # the standard error of the mean of two values is half their distance
        assert row["final_accuracy_sem"] == pytest.approx(abs(finals[arm][0] - finals[arm][1]) / 2)
    diffs = [g - u for g, u in zip(finals["gvm"], finals["uniform"])]
    assert runs["gvm"]["vs_baseline"] == pytest.approx(sum(diffs) / 2)
    assert runs["gvm"]["vs_baseline_sem"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    assert runs["uniform"]["vs_baseline"] == 0
    # the target is uniform's seed-mean final accuracy; uniform reaches it within its run, and an
    # arm reaches it exactly when its own seed-mean final accuracy is not below it
    assert summary["target_accuracy"] == runs["uniform"]["final_accuracy"]
    assert runs["uniform"]["iterations_to_target"] <= 2
    for row in runs.values():
        reached = row["final_accuracy"] >= summary["target_accuracy"]
        assert math.isfinite(row["samples_to_target"]) == reached
        if reached:
            assert 0 <= row["samples_to_target"] <= row["samples_generated"]

    sentence = summary["verdict"]
    assert sentence.endswith(".") and sentence.count(". ") == 0 and "\n" not in sentence
    assert "gvm - uniform = " in sentence and "2 seeds" in sentence
    text = (out / "summary.txt").read_text()
    assert text.rstrip().endswith(sentence) and text.strip() in printed
    for column in ("generated samples", "final accuracy", "vs uniform", "samples to target"):
        assert column in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in runs:  # each run keeps its own config and metrics beside its outputs
        for seed in (0, 1):
            assert (out / arm / f"seed{seed}" / "config.yaml").is_file()

    # a rerun trains nothing more and gives the same summary
    before = (out / "gvm" / "seed1" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "gvm" / "seed1" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text()) == summary


def test_bad_values_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--set", "eval.samples=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.samples" in err and "\n" not in err and "Traceback" not in err
    assert main(["demo", "--output-dir", str(out), "--iterations", "0"]) == 2
    assert capsys.readouterr().err.strip() == "gvmrl demo: iterations: the demo needs at least 1"
    assert main(["demo", "--output-dir", str(out), "--set", "eval.every=0"]) == 2
    assert "eval.every" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(out), "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "--seeds: must be >= 1"
    assert not out.exists()


def arm(
    name: str,
    vs: float,
    sem: float,
    *,
    seeds: int = 3,
    samples: float = 4096,
    to_target: float = 4096,
) -> ArmSummary:
    return ArmSummary(
        arm=name,
        seeds=list(range(seeds)),
        samples_generated=samples,
        final_accuracy=0.55 + vs,
        final_accuracy_sem=0.01,
        vs_baseline=vs,
        vs_baseline_sem=sem,
        iterations_to_target=8.0 if math.isfinite(to_target) else math.inf,
        samples_to_target=to_target,
    )


UNIFORM = arm("uniform", 0.0, 0.0)


def test_verdict_no_difference_within_two_standard_errors():
    assert verdict([UNIFORM, arm("gvm", 0.004, 0.009, samples=8192, to_target=6144)]) == (
        "Verdict: no difference beyond two standard errors between gvm and uniform "
        "(gvm - uniform = +0.4 +- 0.9 points, 3 seeds), and gvm generated 2.0x the samples, "
        "reaching uniform's final accuracy with 1.5x its samples."
    )
    # exactly two standard errors is still no difference
    assert verdict([UNIFORM, arm("gvm", -0.02, 0.01)]).startswith("Verdict: no difference beyond")


def test_verdict_ahead_at_equal_generated_samples():
    assert verdict([UNIFORM, arm("gvm", 0.031, 0.008, samples=4100, to_target=2048)]) == (
        "Verdict: gvm ahead of uniform by 3.1 points "
        "(gvm - uniform = +3.1 +- 0.8 points, 3 seeds), at equal generated samples."
    )


def test_verdict_behind_and_not_reaching_the_target():
    assert verdict([UNIFORM, arm("gvm", -0.025, 0.005, samples=8192, to_target=math.inf)]) == (
        "Verdict: gvm behind uniform by 2.5 points (gvm - uniform = -2.5 +- 0.5 points, "
        "3 seeds), and gvm generated 2.0x the samples without reaching uniform's final accuracy."
    )


def test_verdict_when_uniform_did_not_improve():
    flat = arm("uniform", 0.0, 0.0, to_target=0.0)
    assert verdict([flat, arm("gvm", 0.001, 0.004, samples=8192, to_target=0.0)]).endswith(
        "and gvm generated 2.0x the samples, while uniform ended no higher than it started."
    )


def test_verdict_with_one_seed_gives_none():
    one = arm("gvm", 0.05, math.nan, seeds=1)
    assert verdict([arm("uniform", 0.0, math.nan, seeds=1), one]) == (
        "Verdict: one seed cannot separate gvm from uniform "
        "(gvm - uniform = +5.0 points, no standard error); run --seeds 3 or more."
    )


def test_verdict_is_one_sentence_over_several_arms():
    sentence = verdict([UNIFORM, arm("gvm", 0.0, 0.01), arm("rule", 0.03, 0.01)])
    first, second = sentence.split("; ")
    assert first.startswith("Verdict: no difference beyond two standard errors between gvm and")
    assert second.startswith("rule ahead of uniform by 3.0 points") and sentence.endswith(".")
    assert verdict([UNIFORM]) == "Verdict: only uniform ran: nothing to compare."
