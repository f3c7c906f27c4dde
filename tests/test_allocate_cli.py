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
    """Each option changes the sizes away from the default's [4, 5, 3], so one the command
    dropped would fail its check. Weights w = G / sqrt(p + alpha / p^(beta - 1)), G = 1."""
    stats = write_stats(
        tmp_path / "s.jsonl", [{"accept_rate": p, "grad_norm": 1.0} for p in (0.5, 0.25, 0.9)]
    )

    def sizes_with(*options: str, budget: int = 12) -> list[int]:
        argv = ["allocate", "--stats", str(stats), "--budget", str(budget), *options]
        assert main([*argv, "--output", "-"]) == 0
        return json.loads(capsys.readouterr().out)

    # default: w = 1.4114, 1.9842, 1.0534 (sum 4.4490); shares of 12: 3.807, 5.352, 2.841
    # -> floors 3, 5, 2; the remainders .841 and .807 take the last two
    assert sizes_with() == [4, 5, 3]
    # p = .9 dropped: 12 split 1.4114 : 1.9842 -> 4.988, 7.012 -> 5, 7
    assert sizes_with("--drop-above", "0.8") == [5, 7, 0]
    assert sizes_with("--rule", "uniform") == [4, 4, 4]
    # rule shares .3172, .4460, .2368 mixed .1 : .9 with 1/3 each -> 3.98, 4.14, 3.88 of 12
    assert sizes_with("--uniform-share", "0.9") == [4, 4, 4]
    # a cap of 4 binds (5 > 4): 3 prompts x 4 hold exactly 12
    assert sizes_with("--max-size", "4") == [4, 4, 4]
    # of 13, uncapped 4.124, 5.798, 3.078 -> [4, 6, 3]; a cap of 5 keeps b at 5 and the other 8
    # go 1.4114 : 1.0534 -> 4.581, 3.419 -> 5, 3
    assert sizes_with(budget=13) == [4, 6, 3]
    assert sizes_with("--max-size", "5", budget=13) == [5, 5, 3]
    # the floor 4 lifts c (2.841) and, with the budget fixed, holds every prompt at 4
    assert sizes_with("--min-size", "4") == [4, 4, 4]
    # expected accepts p x share: 1.90, 1.34, 2.56; b (< 1.5) is dropped and 12 split
    # 1.4114 : 1.0534 -> 6.871, 5.129 -> 7, 5
    assert sizes_with("--min-expected-accepts", "1.5") == [7, 0, 5]
    # alpha 1: w = 1/sqrt(p + 1/p) = .6325, .4851, .7052 -> 4.164, 3.194, 4.643 -> 4, 3, 5
    assert sizes_with("--alpha", "1") == [4, 3, 5]
    # and beta 3: w = 1/sqrt(p + 1/p^2) = .4714, .2481, .6845 -> 4.029, 2.120, 5.850 -> 4, 2, 6
    assert sizes_with("--alpha", "1", "--beta", "3") == [4, 2, 6]


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
