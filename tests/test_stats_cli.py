"""`gvmrl stats` end to end on a tiny saved model, checked against one backward per sample."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer
from gvmrl.cli import main
from gvmrl.data import format_prompt
from gvmrl.models import load_model_and_tokenizer

ROWS = [
    {"prompt_id": "a", "prompt": "1+2", "response": "1+2=3. \\boxed{3}", "score": 1.0},
    {"prompt_id": "a", "prompt": "1+2", "response": "\\boxed{4}", "score": 0.0},
    {
        "prompt_id": "a",
        "prompt": "1+2",
        "response": "\\boxed{3}",
        "score": 1.0,
        "finish_reason": "length",
    },
    {"prompt_id": 7, "prompt": "2*3", "response": "\\boxed{5}", "score": 0.0},
    {"prompt_id": "c", "prompt": "9-4", "response": "9-4=5. \\boxed{5}", "score": 1.0},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model of the built-in architecture, saved as a checkpoint directory."""
    from transformers import Qwen2ForCausalLM

    tokenizer = builtin_tokenizer()
    config = builtin_model_config(tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def naive_norm(model, tokenizer, row, instruction):
    """Gradient norm w.r.t. the (tied) embedding matrix from one backward of -sum log pi."""
    prompt = tokenizer.encode(
        format_prompt(tokenizer, row["prompt"], instruction), add_special_tokens=False
    )
    response = tokenizer.encode(row["response"], add_special_tokens=False)
    if row.get("finish_reason") != "length":
        response.append(tokenizer.eos_token_id)
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    loss = -sum(logp[len(prompt) + k - 1, token] for k, token in enumerate(response))
    (grad,) = torch.autograd.grad(loss, [model.get_input_embeddings().weight])
    return float(grad.norm())


def test_stats_match_naive_loop(model_dir, tmp_path):
    scored = write_rows(tmp_path / "scored.jsonl", ROWS)
    out = tmp_path / "stats.jsonl"
    args = ["--completions", str(scored), "--output", str(out), "--batch-size", "2"]
    assert (
        main(["stats", "--model", str(model_dir), *args, "--no-instruction", "--device", "cpu"])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    expected_a = (
        naive_norm(model, tokenizer, ROWS[0], None) + naive_norm(model, tokenizer, ROWS[2], None)
    ) / 2
    assert [r["prompt_id"] for r in rows] == ["a", 7, "c"]
    assert rows[0]["accept_rate"] == pytest.approx(2 / 3)
    assert (rows[0]["num_samples"], rows[0]["num_accepted"]) == (3, 2)
    assert rows[0]["grad_norm"] == pytest.approx(expected_a, rel=1e-3)
    assert rows[1] == {
        "prompt_id": 7,
        "accept_rate": 0.0,
        "grad_norm": 0.0,
        "num_samples": 1,
        "num_accepted": 0,
    }
    assert rows[2]["grad_norm"] == pytest.approx(
        naive_norm(model, tokenizer, ROWS[4], None), rel=1e-3
    )


def test_subprocess_with_instruction_feeds_allocate(model_dir, tmp_path):
    scored = write_rows(tmp_path / "scored.jsonl", ROWS[3:])
    out = tmp_path / "stats.jsonl"
    cmd = [sys.executable, "-m", "gvmrl", "stats", "--model", str(model_dir)]
    cmd += ["--completions", str(scored), "--output", str(out), "--params", "lm_head"]
    cmd += ["--instruction", "Think."]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    # tied embeddings: `lm_head` names the shared matrix, the same group as embed_tokens
    assert rows[1]["grad_norm"] == pytest.approx(
        naive_norm(model, tokenizer, ROWS[4], "Think."), rel=1e-3
    )
    sizes = tmp_path / "sizes.json"
    assert main(["allocate", "--stats", str(out), "--budget", "8", "--output", str(sizes)]) == 0
    assert json.loads(sizes.read_text()) == [0, 8]  # p = 0 gets nothing


@pytest.mark.parametrize(
    "bad_row,message",
    [
        ({"prompt": "x", "response": "y", "score": 1}, "field 'prompt_id' missing"),
        (
            {"prompt_id": "a", "prompt": "x", "response": 3, "score": 1},
            "field 'response' must be str",
        ),
        (
            {"prompt_id": "a", "prompt": "x", "response": "y", "score": "1"},
            "field 'score' must be number",
        ),
        (
            {"prompt_id": "a", "prompt": "other", "response": "y", "score": 1},
            "field 'prompt' differs",
        ),
    ],
)
def test_bad_rows_name_line_and_field(tmp_path, capsys, bad_row, message):
    scored = write_rows(tmp_path / "scored.jsonl", [ROWS[0], bad_row])
    out = tmp_path / "stats.jsonl"
    assert (
        main(["stats", "--model", "unused", "--completions", str(scored), "--output", str(out)])
        == 2
    )
    assert f"{scored}:2: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_unsupported_params_is_an_input_error(model_dir, tmp_path, capsys):
    scored = write_rows(tmp_path / "scored.jsonl", ROWS[:1])
    args = [
        "stats",
        "--model",
        str(model_dir),
        "--completions",
        str(scored),
        "--output",
        str(tmp_path / "o.jsonl"),
    ]
    assert main([*args, "--params", "layers.0"]) == 2
    assert "exact batched" in capsys.readouterr().err
