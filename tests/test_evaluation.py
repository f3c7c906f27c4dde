"""Evaluation: pass@k against brute force, aggregation of scripted responses, `gvmrl eval`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer
from gvmrl.cli import main
from gvmrl.evaluation import evaluate, pass_at_k, pass_k_values
from gvmrl.records import PromptRecord
from gvmrl.rollout import Sample, SamplingParams, make_engine
from gvmrl.verify import Grader

REPO = Path(__file__).resolve().parents[1]


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accept rate
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_k_values_are_powers_of_two_up_to_samples():
    assert pass_k_values(1) == [1]
    assert pass_k_values(8) == [1, 2, 4, 8]
    assert pass_k_values(12) == [1, 2, 4, 8]


class ScriptedEngine:
    """Returns fixed responses per prompt text and records the prompts and seeds of each call."""

    def __init__(self, responses: dict[str, list[str]]):
        self.responses = responses
        self.calls: list[tuple[list[str], list[int] | None]] = []

    def generate(self, prompts, num_samples, params, seeds=None):
        self.calls.append((list(prompts), seeds))
        return [
            Sample(i, [1], [2] * (j + 1), self.responses[p][j], [0.0] * (j + 1), "stop")
            for i, (p, n) in enumerate(zip(prompts, num_samples))
            for j in range(n)
        ]

    def sync_weights(self, model):
        pass


class NoTemplate:
    chat_template = None


def test_evaluate_aggregates_grades_per_prompt():
    records = [
        PromptRecord("a", "1+2", "3"),
        PromptRecord("b", "2*2", "4"),
        PromptRecord("c", "half", "\\frac{1}{2}"),
    ]
    engine = ScriptedEngine(
        {
            # 2 of 4: a bare "3" is no answer
            "1+2\n": ["\\boxed{3}", "\\boxed{3}", "\\boxed{5}", "3"],
            "2*2\n": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"],  # 1 of 4
            "half\n": ["\\boxed{0.5}"] * 4,  # 4 of 4: math-verify equivalence
        }
    )
    with Grader(workers=0) as grader:
        result, regrouped = (
            evaluate(
                engine,
                NoTemplate(),
                records,
                samples=4,
                params=SamplingParams(seed=7),
                grader=grader,
                instruction=None,
                prompts_per_call=per_call,
            )
            for per_call in (2, 3)
        )
    assert [row["scores"] for row in result.rows] == [[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert [row["accept_rate"] for row in result.rows] == [0.5, 0.25, 1.0]
    assert result.accuracy == pytest.approx(7 / 12)
    expected = {k: sum(brute_force_pass_at_k(4, c, k) for c in (2, 1, 4)) / 3 for k in (1, 2, 4)}
    assert result.pass_at_k == pytest.approx(expected)
    assert result.rows[0]["preds"][:3] == ["3", "3", "5"]
    assert result.mean_response_tokens == pytest.approx(2.5)
    assert result.truncated_fraction == 0.0
    # two engine calls (2 prompts, then 1), then one of 3; each sample's seed depends on its
    # record and k, not on the grouping: both give the same 12 distinct seeds
    assert [len(p) for p, _ in engine.calls] == [2, 1, 3]
    split_seeds = engine.calls[0][1] + engine.calls[1][1]
    assert engine.calls[2][1] == split_seeds
    assert len(set(split_seeds)) == 12
    assert regrouped.rows == result.rows


def tiny_checkpoint(path: Path) -> Path:
    """Save the built-in architecture cut to 2 layers, random weights, as a checkpoint directory,
    not marked as the built-in model (so prompts get the instruction)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = builtin_tokenizer()
    config = builtin_model_config(tokenizer).to_dict()
    config.pop("layer_types")  # derived again from num_hidden_layers
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config.from_dict({**config, "num_hidden_layers": 2, "gvmrl_builtin": False})
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPT_ROWS = [
    {"problem": "1+2", "answer": "3"},
    {"problem": "4*2", "answer": "8"},
    {"problem": "9-9", "answer": 0},
]


def test_evaluate_with_the_hf_engine_is_reproducible(tmp_path):
    from gvmrl.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_checkpoint(tmp_path / "m")))
    records = [
        PromptRecord(str(i), r["problem"], str(r["answer"])) for i, r in enumerate(PROMPT_ROWS)
    ]
    engine = make_engine("hf", model, tokenizer)
    params = SamplingParams(max_new_tokens=6, seed=1)
    with Grader(workers=0) as grader:

        def run(subset=records, **options):
            return evaluate(
                engine,
                tokenizer,
                subset,
                samples=2,
                params=params,
                grader=grader,
                instruction=None,
                **options,
            )

        runs = [run() for _ in range(2)]
        one_per_call = run(prompts_per_call=1)  # the same samples, one prompt per engine call
        tail = run(records[1:], first_record_index=1)  # a rank evaluating records 1-2 of the set
    assert runs[0].rows == runs[1].rows
    assert one_per_call.rows == runs[0].rows
    assert tail.rows == runs[0].rows[1:]
    assert [len(row["responses"]) for row in runs[0].rows] == [2, 2, 2]
    assert all(0 < n <= 6 for row in runs[0].rows for n in row["response_tokens"])


def test_eval_cli_writes_summary_and_rows(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "model")
    data = write_prompts(tmp_path / "arith.jsonl", PROMPT_ROWS)
    output = tmp_path / "out" / "results.json"
    argv = [
        *("eval", "--model", str(model_dir), "--data", str(data), "--data", str(data)),
        *("--samples", "2", "--max-new-tokens", "5", "--workers", "0", "--no-progress"),
        *("--output", str(output)),
    ]
    assert main(argv) == 0
    summary = json.loads(output.read_text())
    assert summary["instruction"].endswith("\\boxed{}.")  # non-builtin models get the instruction
    assert summary["sampling"]["max_new_tokens"] == 5
    assert set(summary["results"]) == {"arith", "arith-2"}
    for name, result in summary["results"].items():
        rows_file = output.parent / f"results.{name}.jsonl"
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
        assert [row["id"] for row in rows] == ["000000", "000001", "000002"]
        scores = [s for row in rows for s in row["scores"]]
        assert result["accuracy"] == pytest.approx(sum(scores) / len(scores))
        assert set(result) >= {"pass@1", "pass@2", "prompts", "truncated_fraction"}
        assert result["pass@1"] == pytest.approx(result["accuracy"])


def test_eval_cli_builtin_model_defaults_to_no_instruction(tmp_path):
    output = tmp_path / "results.json"
    argv = [
        *("eval", "--model", "builtin", "--data", "builtin", "--limit", "3", "--samples", "1"),
        *("--max-new-tokens", "4", "--workers", "0", "--no-progress", "--output", str(output)),
    ]
    assert main(argv) == 0
    summary = json.loads(output.read_text())
    assert summary["instruction"] is None
    assert summary["results"]["builtin"]["prompts"] == 3
    rows = (tmp_path / "results.builtin.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["id"].startswith("builtin-default-test-")


def test_eval_cli_bad_row_exits_2_without_output(tmp_path):
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2"}]
    data = write_prompts(tmp_path / "bad.jsonl", rows)
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gvmrl", "eval", "--model", str(tmp_path / "unused")]
        + ["--data", str(data), "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{data}:2: field 'answer' missing" in proc.stderr
    assert list(tmp_path.iterdir()) == [data]


def test_eval_cli_skips_or_refuses_prompts_longer_than_the_context(tmp_path, capsys):
    """A 1 MB problem (the built-in context is 512) is skipped and counted, or stops the command
    before sampling with --overlong error; it never reaches the engine."""
    model_dir = tiny_checkpoint(tmp_path / "model")
    huge = {"id": "huge", "problem": "1+" * 500_000 + "1", "answer": "500001"}
    near = {"id": "near", "problem": "1" * 300, "answer": "1"}  # fits alone, not with 256 new
    data = write_prompts(tmp_path / "long.jsonl", [PROMPT_ROWS[0], huge, near, PROMPT_ROWS[1]])
    output = tmp_path / "results.json"
    argv = [
        *("eval", "--model", str(model_dir), "--data", str(data), "--samples", "1"),
        *("--max-new-tokens", "256", "--workers", "0", "--no-progress", "--output", str(output)),
    ]
    assert main(argv) == 0
    result = json.loads(output.read_text())["results"]["long"]
    assert result["prompts"] == 2 and result["skipped_overlong"] == 2
    rows = [json.loads(line) for line in (tmp_path / "results.long.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["000000", "000003"]
    assert "skipped 2 prompts longer than" in capsys.readouterr().err

    output.unlink()
    assert main([*argv, "--overlong", "error"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"{data}: prompt 'huge' is ")
    assert "Traceback" not in err
    assert not output.exists()
