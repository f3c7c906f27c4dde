"""Supervised warm start: target masking, schedule, micro-batches, a short real run, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from gvmrl.cli import main
from gvmrl.models import builtin_model_config, builtin_tokenizer
from gvmrl.pretrain import (
    IGNORE_INDEX,
    _optimizer_step,
    collate,
    encode_examples,
    learning_rate,
    pretrain,
)
from gvmrl.task import generate_problems


def test_examples_put_the_solution_and_end_token_after_the_prompt():
    tokenizer = builtin_tokenizer()
    problem = generate_problems(1, seed=4)[0]
    [(ids, prompt_len)] = encode_examples(tokenizer, [problem])
    assert tokenizer.decode(ids[:prompt_len]) == f"<|user|>{problem.problem}<|end|><|assistant|>"
    assert tokenizer.decode(ids[prompt_len:]) == problem.solution + "<|end|>"


def test_collate_masks_prompt_and_padding():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, ignore, 7, 8], [ignore, 10, ignore, ignore]]


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    assert learning_rate(0, 100, 1.0, 10, floor=0.1) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, floor=0.1) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10, floor=0.1) == pytest.approx(1.0)
    # halfway through the decay: cos(pi/2) = 0, so halfway between peak and floor
    assert learning_rate(55, 100, 1.0, 10, floor=0.1) == pytest.approx(0.55)
    assert learning_rate(100, 100, 1.0, 10, floor=0.1) == pytest.approx(0.1)
    assert learning_rate(100, 100, 2.0, 10, floor=0.0) == pytest.approx(0.0, abs=1e-12)


def test_micro_batches_give_the_full_batch_step():
    """Accumulated re-weighted micro-batch losses = one step on the mean over all target tokens."""
    tokenizer = builtin_tokenizer()
    examples = encode_examples(tokenizer, generate_problems(6, seed=2))
    states, losses = [], []
    for micro in (6, 4):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(builtin_model_config(tokenizer))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, n_targets = _optimizer_step(model, optimizer, examples, tokenizer.pad_token_id, micro)
        losses.append(loss)
        states.append(model.state_dict())
    assert n_targets == sum(len(ids) - p for ids, p in examples)
    # independent reference: cross-entropy summed over every target token, divided by their count
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(builtin_model_config(tokenizer))
    total = 0.0
    for ids, prompt_len in examples:
        logits = model(torch.tensor([ids])).logits[0]
        targets = torch.tensor(ids[prompt_len:])
        total += torch.nn.functional.cross_entropy(
            logits[prompt_len - 1 : -1], targets, reduction="sum"
        ).item()
    assert losses[0] == pytest.approx(total / n_targets, rel=1e-4)
    for loss, state in zip(losses[1:], states[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-4)
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, states[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_short_pretrain_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    metrics = pretrain(tmp_path / "ckpt", steps=10, batch_size=8, warmup_steps=2, progress=False)
    assert metrics["steps"] == 10 and metrics["parameters"] == 1_064_320
    assert (
        math.isfinite(metrics["final_loss"]) and metrics["final_loss"] < metrics["first_loss"] - 0.5
    )
    assert json.loads((tmp_path / "ckpt" / "pretrain.json").read_text()) == metrics
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(model, Qwen2ForCausalLM) and model.config.tie_word_embeddings
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


@pytest.mark.slow
def test_pretrain_cli_matches_the_library_given_the_seed(tmp_path, capsys):
    assert main(["pretrain", "--output", str(tmp_path / "bad"), "--steps", "0"]) == 2
    assert "--steps: must be >= 1" in capsys.readouterr().err
    assert main(["pretrain", "--output", str(tmp_path / "bad"), "--min-lr-ratio", "1.5"]) == 2
    assert "--min-lr-ratio: must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    output = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gvmrl",
            "pretrain",
            "--output",
            str(output),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--seed",
            "3",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "pretrain step 2/2" in result.stderr  # plain progress lines when not on a terminal
    assert json.loads(result.stdout.rsplit("saved checkpoint", 1)[0])["steps"] == 2
    pretrain(tmp_path / "lib", steps=2, batch_size=4, seed=3, progress=False)
    cli_state = AutoModelForCausalLM.from_pretrained(output).state_dict()
    lib_state = AutoModelForCausalLM.from_pretrained(tmp_path / "lib").state_dict()
    assert all(
        torch.equal(cli_state[k], lib_state[k]) for k in lib_state
    )  # deterministic across processes
