"""Built-in tokenizer, model config, the shipped checkpoint, loading HF checkpoints from disk."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from gvmrl.builtin.model import (
    BUILTIN,
    CHARACTERS,
    SPECIAL_TOKENS,
    builtin_checkpoint,
    builtin_model_config,
    builtin_tokenizer,
)
from gvmrl.cli import main
from gvmrl.models import load_model_and_tokenizer

TEXT = "a=3; b=a*4; what is b?\n3*4=12. \\boxed{12} ~{}[]|`"


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = builtin_tokenizer()
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 102
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert [tokenizer.decode([i]) for i in ids] == list(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert set(tokenizer("é", add_special_tokens=False)["input_ids"]) == {tokenizer.unk_token_id}


def test_special_tokens_and_chat_template():
    tokenizer = builtin_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token) == (0, "<|end|>")
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>S<|end|><|user|>Q<|end|><|assistant|>A<|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 9  # every marker is one token
    assert tokenizer.decode(ids, skip_special_tokens=True) == "SQA"
    prompt = tokenizer.apply_chat_template(
        messages[1:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|assistant|>")


def test_tokenizer_saves_and_loads_with_auto_tokenizer(tmp_path):
    tokenizer = builtin_tokenizer()
    tokenizer.save_pretrained(tmp_path / "alone")
    # beside a qwen2 config.json, AutoTokenizer rebuilds it as a byte-level Qwen2Tokenizer
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    builtin_model_config(tokenizer).save_pretrained(tmp_path / "checkpoint")
    for loaded in (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("alone", "checkpoint")):
        _assert_same_tokenizer(loaded, tokenizer)


def _assert_same_tokenizer(loaded, tokenizer):
    assert loaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert loaded.decode(loaded(TEXT)["input_ids"]) == TEXT
    messages = [{"role": "user", "content": "Q"}]
    assert (
        loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "<|user|>Q<|end|><|assistant|>"
    )
    assert (loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_builtin_model_config_has_about_a_million_parameters():
    config = builtin_model_config(builtin_tokenizer())
    assert isinstance(config, Qwen2Config) and config.tie_word_embeddings
    model = Qwen2ForCausalLM(config)
    # hand count: embeddings V*h; per layer q/k/v/o weights 4h^2, qkv biases 3h, MLP 3hm,
    # two norms 2h; final norm h
    h, m, vocab = 128, 512, 102
    expected = vocab * h + 4 * (4 * h * h + 3 * h + 3 * h * m + 2 * h) + h
    assert sum(p.numel() for p in model.parameters()) == expected == 1_064_320


def _tiny_qwen2(tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=7,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def test_load_random_two_layer_qwen2_from_a_directory(tmp_path):
    tokenizer = builtin_tokenizer()
    model = _tiny_qwen2(tokenizer).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path), dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=1e-4, atol=1e-5)
    # the configured end id stays, the tokenizer's EOS is added; pads with the pad id
    assert loaded.generation_config.eos_token_id == [7, tokenizer.eos_token_id]
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.pad_token_id == 0


def test_missing_pad_token_and_chat_turn_end_are_filled_in(tmp_path):
    tokenizer = builtin_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.pad_token = None
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    _tiny_qwen2(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model_and_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|end|>"
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [7, loaded.eos_token_id, im_end]


def test_builtin_loads_the_shipped_checkpoint_without_pretraining(monkeypatch):
    import gvmrl.builtin.pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("`builtin` must load the shipped weights, not pretrain")

    monkeypatch.setattr(gvmrl.builtin.pretrain, "pretrain", refuse)
    path = builtin_checkpoint()
    assert (path / "model.safetensors").stat().st_size > 4_000_000  # 1.06M float32 parameters
    model, tokenizer = load_model_and_tokenizer(BUILTIN)
    assert isinstance(model, Qwen2ForCausalLM) and model.config.num_hidden_layers == 4
    assert model.config.gvmrl_builtin and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 1_064_320
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id]
    _assert_same_tokenizer(tokenizer, builtin_tokenizer())
    assert json.loads((path / "pretrain.json").read_text())["steps"] == 640  # the default recipe


def _builtin_eval_accuracy(model: str, tmp_path, *, prompts: int, samples: int, seed: int) -> float:
    """Final-answer accuracy on the held-out split at T=1 through `gvmrl eval`, with the training
    loop's response cap (rollout.max_new_tokens, 96)."""
    output = tmp_path / f"eval-{seed}" / "results.json"
    argv = [
        *("eval", "--model", model, "--data", "builtin", "--limit", str(prompts)),
        *("--samples", str(samples), "--seed", str(seed), "--temperature", "1"),
        *("--max-new-tokens", "96", "--workers", "0", "--no-progress", "--output", str(output)),
    ]
    assert main(argv) == 0
    return json.loads(output.read_text())["results"]["builtin"]["accuracy"]


@pytest.mark.slow
def test_shipped_checkpoint_scores_its_measured_held_out_accuracy(tmp_path):
    # Measured on 128 held-out prompts x 4 samples with eval seeds 0-3: 0.486-0.518 (the standard
    # error of one such evaluation is about 2.5 points). 0.35-0.65 fails for random weights, a
    # tokenizer that mis-encodes the prompt, or a model that does not stop.
    accuracy = _builtin_eval_accuracy(BUILTIN, tmp_path, prompts=128, samples=4, seed=1)
    assert 0.35 <= accuracy <= 0.65
    # the same architecture and tokenizer with random weights solves nothing
    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    Qwen2ForCausalLM(builtin_model_config(tokenizer)).save_pretrained(tmp_path / "random")
    tokenizer.save_pretrained(tmp_path / "random")
    random_model = str(tmp_path / "random")
    assert _builtin_eval_accuracy(random_model, tmp_path, prompts=32, samples=2, seed=1) < 0.02
