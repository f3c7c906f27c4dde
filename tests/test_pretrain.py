"""Supervised warm start: targets, micro-batches, a short real run, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer
from gvmrl.builtin.pretrain import accumulate_gradients, encode_examples, pretrain
from gvmrl.builtin.task import generate_problems
from gvmrl.cli import main


def test_examples_put_the_solution_and_end_token_after_the_prompt():
    tokenizer = builtin_tokenizer()
    problem = generate_problems(1, seed=4)[0]
    [(prompt_ids, target_ids)] = encode_examples(tokenizer, [problem])
    assert tokenizer.decode(prompt_ids) == f"<|user|>{problem.problem}<|end|><|assistant|>"
    assert tokenizer.decode(target_ids) == problem.solution + "<|end|>"


def test_micro_batches_give_the_full_batch_gradient():
    """Accumulated micro-batch losses = the mean cross-entropy over all target tokens."""
    tokenizer = builtin_tokenizer()
    examples = encode_examples(tokenizer, generate_problems(6, seed=2))
    grads, losses = [], []
    for micro in (6, 4, 1):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(builtin_model_config(tokenizer))
        loss, n_targets = accumulate_gradients(model, examples, tokenizer.pad_token_id, micro)
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert n_targets == sum(len(t) for _, t in examples)
    # independent reference: the HF cross-entropy summed over every target token of each unpadded
    # sequence, divided by their count, and its gradient
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(builtin_model_config(tokenizer))
    total = 0.0
    for prompt_ids, target_ids in examples:
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
        loss = torch.nn.functional.cross_entropy(
            logits[len(prompt_ids) - 1 : -1], torch.tensor(target_ids), reduction="sum"
        )
        (loss / n_targets).backward()
        total += loss.item()
    assert losses[0] == pytest.approx(total / n_targets, rel=1e-5)
    for loss, grad in zip(losses, grads):
        assert loss == pytest.approx(losses[0], rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grad[name], p.grad, rtol=1e-4, atol=1e-6)


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
