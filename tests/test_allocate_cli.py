"""`gvmrl allocate`: file formats, error reporting and the no-partial-output guarantee."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gvmrl.cli import main


def write_stats(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_allocates_in_row_order(tmp_path, capsys):
    stats = write_stats(
        tmp_path / "stats.jsonl",
        [
            {"prompt_id": "a", "accept_rate": 0.5, "grad_norm": 1.0},
            {"prompt_id": "b", "accept_rate": 0.25, "grad_norm": 1.0, "extra": [1, 2]},
            {"prompt_id": "c", "accept_rate": 0.0, "grad_norm": 3.0},
            {"prompt_id": "d", "accept_rate": 1, "grad_norm": 1},
        ],
    )
    out = tmp_path / "sizes.json"
    assert main(["allocate", "--stats", str(stats), "--budget", "10", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == [3, 5, 0, 2]  # hand-computed in test_allocation.py
    err = capsys.readouterr().err
    assert "4 prompts" in err and "zero-allocated prompts: 1" in err and "max size: 5" in err


def test_options_are_passed_through(tmp_path, capsys):
    stats = write_stats(
        tmp_path / "s.jsonl", [{"accept_rate": p, "grad_norm": 1.0} for p in (0.5, 0.25, 0.9)]
    )

    def sizes_with(*options: str) -> list[int]:
        argv = ["allocate", "--stats", str(stats), "--budget", "12", *options, "--output", "-"]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    assert sizes_with("--drop-above", "0.8") == [5, 7, 0]
    assert sizes_with("--rule", "uniform") == [4, 4, 4]
    # rule shares .3172, .4460, .2368 mixed .1 : .9 with 1/3 each -> 3.98, 4.14, 3.88 of 12
    assert sizes_with("--uniform-share", "0.9") == [4, 4, 4]
    sizes = sizes_with("--max-size", "5")
    assert sum(sizes) == 12 and max(sizes) <= 5


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"accept_rate": 0.5, "grad_norm": 1}', '{"accept_rate": 1.5, "grad_norm": 1}'],
            ":2: accept_rate",
        ),
        (['{"accept_rate": 0.5, "grad_norm": 1}', '{"grad_norm": 1}'], ":2: accept_rate missing"),
        (['{"accept_rate": 0.5, "grad_norm": -1}'], ":1: grad_norm"),
        (['{"accept_rate": "high", "grad_norm": 1}'], ":1: accept_rate must be a number"),
        (
            ['{"accept_rate": 0.5, "grad_norm": 1}', "", '{"accept_rate": 0.5, "grad_norm": 1}'],
            ":2: blank line",
        ),
        (['{"accept_rate": 0.5, "grad_norm": 1}', "{not json"], ":2: invalid JSON"),
    ],
)
def test_bad_row_exits_2_and_writes_nothing(tmp_path, capsys, lines, message):
    stats = tmp_path / "stats.jsonl"
    stats.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sizes.json"
    assert main(["allocate", "--stats", str(stats), "--budget", "4", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{stats}{message}")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [stats]  # no temporary file left behind either


def test_existing_output_survives_a_failed_run(tmp_path):
    stats = write_stats(tmp_path / "s.jsonl", [{"accept_rate": 0.5, "grad_norm": 1.0}])
    out = tmp_path / "sizes.json"
    out.write_text("[7]\n")
    assert (
        main(
            [
                "allocate",
                "--stats",
                str(stats),
                "--budget",
                "4",
                "--max-size",
                "2",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert out.read_text() == "[7]\n"


def test_subprocess_entry_point(tmp_path):
    stats = write_stats(
        tmp_path / "s.jsonl",
        [{"accept_rate": 0.5, "grad_norm": 2.0}, {"accept_rate": 1.0, "grad_norm": 1.0}],
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gvmrl",
            "allocate",
            "--stats",
            str(stats),
            "--budget",
            "9",
            "--output",
            "-",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # w = 2/sqrt(.502) = 2.8228, 1/sqrt(1.001) = 0.9995 -> shares 6.65, 2.35 -> 7, 2
    assert json.loads(result.stdout) == [7, 2]
