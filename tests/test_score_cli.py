"""Tests of `gvmrl score`: row-preserving output, accuracy report, validation before grading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gvmrl.cli import main

ROWS = [
    {"id": 0, "response": "3+5=8. \\boxed{8}", "answer": 8},
    {"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"},
    {"id": 2, "response": "The answer is 7.", "answer": "6"},
    {"id": 3, "response": "I am not sure", "answer": "2"},
    {"id": 4, "response": "\\boxed{84, 69}", "answer": ["69", "84"]},
]
EXPECTED = [
    (1.0, "8", "match"),
    (1.0, "\\frac{1}{2}", "match"),
    (0.0, "7", "mismatch"),
    (0.0, None, "no_answer"),
    (1.0, "84, 69", "match"),
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_score_adds_score_pred_and_reason(tmp_path: Path, capsys, workers: str) -> None:
    source = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--input", str(source), "--output", str(out), "--workers", workers]) == 0
    rows = _read(out)
    assert [
        {k: v for k, v in row.items() if k not in ("score", "pred", "reason")} for row in rows
    ] == ROWS
    assert [(row["score"], row["pred"], row["reason"]) for row in rows] == EXPECTED
    assert "accuracy: 0.6000 (3/5)" in capsys.readouterr().err


def test_custom_field_names(tmp_path: Path, capsys) -> None:
    rows = [{"completion": "\\boxed{2}", "gold": "2"}, {"completion": "\\boxed{3}", "gold": "2"}]
    source = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = ["score", "--input", str(source), "--output", str(out)]
    assert main(argv + ["--response-field", "completion", "--answer-field", "gold"]) == 0
    assert [row["score"] for row in _read(out)] == [1.0, 0.0]
    assert "accuracy: 0.5000 (1/2)" in capsys.readouterr().err


def test_empty_input(tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--input", str(source), "--output", str(out)]) == 0
    assert out.read_text() == ""
    assert "accuracy: n/a (0/0)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"response": "\\boxed{1}"}, "field 'answer' missing"),
        ({"answer": "1"}, "field 'response' missing"),
        ({"response": 5, "answer": "1"}, "field 'response' must be a string"),
        ({"response": "x", "answer": []}, "field 'answer': reference answer is an empty list"),
        ({"response": "x", "answer": True}, "field 'answer': reference answer True is not"),
        ({"response": "x", "answer": {"a": 1}}, "field 'answer': reference answer element must be"),
    ],
)
def test_bad_row_exits_2_before_grading(
    tmp_path: Path, capsys, bad_row: dict, message: str
) -> None:
    """The bad row is the last one: every row is checked before any output is written."""
    source = _write(tmp_path / "in.jsonl", ROWS + [bad_row])
    out = tmp_path / "out.jsonl"
    assert main(["score", "--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:{len(ROWS) + 1}: {message}" in err
    assert "accuracy" not in err
    assert list(tmp_path.iterdir()) == [source]  # no output, no temporary file left behind


def test_subprocess_end_to_end(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "gvmrl", "score", "--input", str(source), "--output", str(out)]
    command += ["--workers", "1", "--timeout", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [(row["score"], row["pred"], row["reason"]) for row in _read(out)] == EXPECTED
    assert "accuracy: 0.6000 (3/5)" in done.stderr

    missing = _write(tmp_path / "missing.jsonl", [{"response": "\\boxed{1}"}])
    command = [sys.executable, "-m", "gvmrl", "score", "--input", str(missing)]
    command += ["--output", str(tmp_path / "x.jsonl")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{missing}:1: field 'answer' missing" in done.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    "option",
    [["--workers", "-1"], ["--timeout", "0"], ["--timeout", "inf"], ["--timeout", "nan"]],
)
def test_bad_options_are_usage_errors(tmp_path: Path, option: list[str]) -> None:
    source = _write(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--input", str(source), "--output", str(tmp_path / "out.jsonl")] + option)
    assert exit_info.value.code == 2
