"""Outputs (symlinks, special files, permissions, bad paths) and the CLIs' one error path."""

from __future__ import annotations

import json
import os
import stat
from fractions import Fraction
from pathlib import Path

import pytest

from gvmrl.cli import main
from gvmrl.io import InputError, write_json, write_text

STATS = [{"accept_rate": 0.5, "grad_norm": 1.0}, {"accept_rate": 0.25, "grad_norm": 2.0}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_writing_through_a_symlink_replaces_its_target_atomically(tmp_path):
    target = tmp_path / "real" / "out.json"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, [1, 2])
    assert link.is_symlink() and json.loads(target.read_text()) == [1, 2]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file keeps its mode
    assert os.listdir(target.parent) == ["out.json"]  # no temporary left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_files_and_directories_follow_the_umask(tmp_path, umask):
    from gvmrl.io import atomic_directory

    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


def test_fifos_and_directories_are_refused_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        write_text(fifo, "x")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(InputError, match="is a directory"):
        write_text(tmp_path, "x")


def _allocate(tmp_path, output, *extra):
    stats = jsonl(tmp_path / "stats.jsonl", STATS)
    return main(["allocate", "--stats", str(stats), "--budget", "10", "--output", output, *extra])


@pytest.mark.parametrize(
    "output, message",
    [
        (".", "is a directory"),
        ("", "empty output path"),
        ("stats.jsonl/sizes.json", "is a file, not a directory"),
        ("fifo", "not a regular file"),  # as a device would be (never test on /dev as root)
    ],
)
def test_bad_output_paths_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch, output, message):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    assert _allocate(tmp_path, output) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert _allocate(tmp_path, str(locked / "sizes.json")) == 2
    assert "permission denied" in capsys.readouterr().err


def test_a_directory_the_process_may_not_write_is_refused(tmp_path, capsys, monkeypatch):
    """The same refusal where the check runs as root (as in CI): the permission is denied by
    a stand-in for os.access, the call the check makes."""
    import gvmrl.io

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(gvmrl.io.os, "access", lambda path, mode: Path(path) != locked)
    assert _allocate(tmp_path, str(locked / "sizes.json")) == 2
    err = capsys.readouterr().err
    assert f"permission denied: cannot write in {locked}" in err and len(err.splitlines()) == 1
    assert not (locked / "sizes.json").exists()


@pytest.mark.parametrize("command", ["allocate", "score", "prepare"])
def test_non_utf8_input_names_the_line(tmp_path, capsys, command):
    source = tmp_path / "in.jsonl"
    valid = {"accept_rate": 0.5, "grad_norm": 1, "response": "1", "answer": "1", "problem": "p"}
    source.write_bytes(json.dumps(valid).encode() + b'\n{"problem": "caf\xe9", "answer": "1"}\n')
    out = str(tmp_path / "out.json")
    argv = {
        "allocate": ["allocate", "--stats", str(source), "--budget", "4", "--output", out],
        "score": ["score", "--input", str(source), "--output", out],
        "prepare": ["data", "prepare", "--input", str(source), "--output", out],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"{source}:2: not UTF-8 text: byte 0xe9 at column 17\n"


def test_a_huge_budget_is_refused_and_2_to_the_53_sums_exactly(tmp_path, capsys):
    stats = jsonl(tmp_path / "s.jsonl", [{"accept_rate": 0.3, "grad_norm": 1.7}] * 2 + STATS * 3)
    out = tmp_path / "sizes.json"
    for budget in ("9223372036854775808", "1000000000000000000"):
        argv = ["allocate", "--stats", str(stats), "--budget", budget, "--output", str(out)]
        assert main(argv) == 2
        assert "above 2^53" in capsys.readouterr().err and not out.exists()
    budget = 2**53
    argv = ["allocate", "--stats", str(stats), "--budget", str(budget), "--output", str(out)]
    assert main([*argv, "--max-size", str(budget // 5)]) == 0
    sizes = json.loads(out.read_text())
    assert sum(sizes) == budget and max(sizes) <= budget // 5  # Python ints: exact
    # independent check of the shares: w_i = G_i / sqrt(p_i + 1e-3 / p_i), exact fractions
    assert main(argv) == 0
    sizes = json.loads(out.read_text())
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    weights = [r["grad_norm"] / (r["accept_rate"] + 1e-3 / r["accept_rate"]) ** 0.5 for r in rows]
    total = sum(Fraction(w) for w in weights)
    for size, w in zip(sizes, weights):
        assert abs(size - Fraction(w) / total * budget) < 8  # float64 shares at 2^53: +-8
    assert sum(sizes) == budget


def test_empty_stats_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["allocate", "--stats", str(empty), "--budget", "8", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"{empty}: no rows (expected one JSON object per prompt)\n"


def test_data_prepare_refuses_duplicate_ids_and_explains_empty_input(tmp_path, capsys):
    rows = [{"id": "a", "problem": "1+1", "answer": "2"}, {"id": "b", "problem": "2", "answer": 2}]
    source = jsonl(tmp_path / "dup.jsonl", [*rows, {"id": "a", "problem": "3", "answer": 3}])
    out = tmp_path / "out.jsonl"
    assert main(["data", "prepare", "--input", str(source), "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"{source}:3: duplicate id 'a', first used by row 1\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "prepare", "--input", str(empty), "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"{empty}: no rows\n"
    unanswered = jsonl(tmp_path / "u.jsonl", [{"problem": "x", "answer": None}])
    assert main(["data", "prepare", "--input", str(unanswered), "--output", str(out)]) == 2
    assert "no usable rows: 1 rows read, none with an extractable answer" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: None, ["--config", "{d}"], "is a directory, not a file"),
        (lambda d: None, ["--config", "{d}/missing.yaml"], "missing.yaml: file not found"),
        (
            lambda d: (d / "bad.yaml").write_text("iterations: 2\ngvm: [1,\n"),
            ["--config", "{d}/bad.yaml"],
            "bad.yaml:3: invalid YAML",
        ),
        (lambda d: None, ["--set", "gvm.alpha=[1,"], "gvm.alpha: invalid YAML"),
        (lambda d: (d / "f").write_text(""), ["--output-dir", "{d}/f"], "not a directory"),
        (lambda d: None, ["--set", "gvm.min_size=5", "--set", "gvm.max_size=2"], "gvm.max_size"),
        (lambda d: None, ["--set", "gvm.beta=nan"], "gvm.beta: must be finite"),
        (lambda d: None, ["--set", "optim.betas=[0.9,2.0]"], "optim.betas: each must be in"),
        (lambda d: None, ["--set", "rollout.batch_size=0"], "rollout.batch_size: must be >= 1"),
        (lambda d: None, ["--set", "gvm.drop_above=2"], "gvm.drop_above: must be in (0, 1]"),
    ],
)
def test_train_rejects_bad_config_and_paths_before_any_work(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    argv = ["train", *(a.replace("{d}", str(tmp_path)) for a in args)]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
