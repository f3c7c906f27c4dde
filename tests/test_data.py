"""Prompt loading: formats, presets, row-precise errors, built-in specs, prompt format, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gvmrl.builtin.model import builtin_tokenizer
from gvmrl.cli import main
from gvmrl.data import DEFAULT_INSTRUCTION, format_prompt, load_prompts, read_prompts
from gvmrl.io import InputError
from gvmrl.records import PromptRecord

ROWS = [
    {"problem": "1+1?", "answer": 2.0},
    {"problem": "Half of 3?", "answer": 1.5},
    {"problem": "Seven?", "answer": 7.0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_parquet_and_dataset_dir_load_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = [
        PromptRecord("000000", "1+1?", "2"),
        PromptRecord("000001", "Half of 3?", "1.5"),
        PromptRecord("000002", "Seven?", "7"),
    ]
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "e"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "f")
    )
    for source in ["a.jsonl", "b.json", "c.json", "d.parquet", "e"]:
        assert load_prompts(tmp_path / source) == expected, source
    assert load_prompts(tmp_path / "f", split="test") == expected
    with pytest.raises(InputError, match="split 'train' not found"):
        load_prompts(tmp_path / "f")


def test_custom_fields_limit_and_own_ids(tmp_path):
    rows = [
        {"uid": 1, "q": "x?", "a": "1", "id": "p1"},
        {"q": "y?", "a": "2", "id": "p2"},
        {"q": "z?", "a": "3", "id": "p3"},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    records = load_prompts(path, problem_field="q", answer_field="a", limit=2)
    assert records == [PromptRecord("p1", "x?", "1"), PromptRecord("p2", "y?", "2")]


def test_presets(tmp_path):
    gsm8k = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "Q1", "answer": "so 1,200 + 34 = 1,234\n#### 1,234"},
            {"question": "Q2", "answer": "no marker here"},
        ],
    )
    loaded = read_prompts(gsm8k, preset="gsm8k", drop_unanswered=True)
    assert [r.answer for r in loaded.records] == ["1234"] and loaded.dropped_rows == [2]
    numina = write_jsonl(
        tmp_path / "numina.jsonl",
        [
            {"problem": "P", "solution": "First \\boxed{1}, finally $\\boxed{\\frac{1}{2}}$."},
        ],
    )
    assert load_prompts(numina, preset="numina")[0].answer == "\\frac{1}{2}"
    math = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "P", "solution": "so \\boxed{\\{1,2\\}}"},  # raw MATH rows: no answer field
            {"problem": "Q", "answer": "5", "solution": "\\boxed{6}"},
        ],
    )
    assert [r.answer for r in load_prompts(math, preset="math")] == ["\\{1,2\\}", "5"]
    olympiad = write_jsonl(
        tmp_path / "ob.jsonl", [{"question": "P", "final_answer": ["$1$", "$-1$"]}]
    )
    assert load_prompts(olympiad, preset="olympiadbench")[0].answer == ["$1$", "$-1$"]


def test_errors_name_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], {"problem": "no answer"}])
    with pytest.raises(InputError) as error:
        load_prompts(path)
    assert str(error.value) == f"{path}:3: field 'answer' missing"
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"problem": "", "answer": "1"}])
    with pytest.raises(InputError, match=r"bad2.jsonl:1: field 'problem' not a non-empty string"):
        load_prompts(path)
    path = write_jsonl(
        tmp_path / "bad3.jsonl",
        [{"problem": "P", "solution": "\\boxed{1}"}, {"problem": "P", "solution": "no box"}],
    )
    with pytest.raises(
        InputError, match=r"bad3.jsonl:2: field 'solution': no answer could be extracted"
    ):
        load_prompts(path, preset="numina")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file type"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(InputError, match="unknown preset"):
        load_prompts(tmp_path / "bad.jsonl", preset="nope")
    with pytest.raises(InputError, match="file not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_builtin_specs():
    test = load_prompts("builtin:test")
    assert len(test) == 512 and test == load_prompts("builtin", split="test")
    assert test[0].id == "builtin-default-test-00000"
    hard = load_prompts("builtin-hard:test", limit=10)
    assert len(hard) == 10 and hard[0].id == "builtin-hard-test-00000"
    assert int(hard[0].answer) >= 0
    with pytest.raises(InputError, match="unknown built-in task"):
        load_prompts("builtin-nope:test")


def test_format_prompt_uses_the_chat_template():
    tokenizer = builtin_tokenizer()
    assert (
        format_prompt(tokenizer, "Compute (1+2)", None)
        == "<|user|>Compute (1+2)<|end|><|assistant|>"
    )
    assert format_prompt(tokenizer, "P", "") == "<|user|>P<|end|><|assistant|>"
    assert format_prompt(tokenizer, "P") == f"<|user|>P {DEFAULT_INSTRUCTION}<|end|><|assistant|>"
    tokenizer.chat_template = None
    assert format_prompt(tokenizer, "P", "Go.") == "P Go.\n"


def test_prepare_cli_writes_rows_and_a_disjoint_test_split(tmp_path, capsys):
    rows = [{"question": f"Q{i}", "answer": f"work\n#### {i}"} for i in range(10)]
    rows.insert(4, {"question": "bad", "answer": "no marker"})
    source = write_jsonl(tmp_path / "gsm.jsonl", rows)
    output = tmp_path / "out" / "train.jsonl"
    argv = ["data", "prepare", "--preset", "gsm8k", "--input", str(source), "--output", str(output)]
    assert main([*argv, "--split-test", "3", "--seed", "1"]) == 0
    assert "kept 10, dropped 1" in capsys.readouterr().out
    train = [json.loads(line) for line in output.read_text().splitlines()]
    test = [
        json.loads(line)
        for line in (tmp_path / "out" / "train.test.jsonl").read_text().splitlines()
    ]
    assert len(train) == 7 and len(test) == 3
    assert sorted(r["problem"] for r in train + test) == sorted(f"Q{i}" for i in range(10))
    assert all(
        set(r) == {"id", "problem", "answer"} and r["answer"] == r["problem"][1:]
        for r in train + test
    )
    assert (
        main([*argv, "--split-test", "3", "--seed", "1", "--output", str(tmp_path / "again.jsonl")])
        == 0
    )
    assert (tmp_path / "again.test.jsonl").read_text() == (
        tmp_path / "out" / "train.test.jsonl"
    ).read_text()


def test_prepare_cli_bad_row_exits_2_without_output(tmp_path, capsys):
    source = write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "answer": "1"}, {"answer": "2"}])
    output = tmp_path / "out.jsonl"
    assert (
        main(
            ["data", "prepare", "--preset", "math", "--input", str(source), "--output", str(output)]
        )
        == 2
    )
    assert f"{source}:2: field 'problem' missing" in capsys.readouterr().err
    assert not output.exists()
    assert (
        main(
            [
                "data",
                "prepare",
                "--preset",
                "math",
                "--input",
                str(source),
                "--output",
                str(output),
                "--split-test",
                "5",
                "--limit",
                "1",
            ]
        )
        == 2
    )
    assert not output.exists()


def test_prepare_cli_exports_the_builtin_task_in_a_subprocess(tmp_path):
    output = tmp_path / "builtin.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gvmrl",
            "data",
            "prepare",
            "--preset",
            "builtin",
            "--input",
            "builtin-hard:test",
            "--limit",
            "5",
            "--output",
            str(output),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [PromptRecord(**r) for r in rows] == load_prompts("builtin-hard:test", limit=5)
