"""The memory plan: exact parameter counts, activation estimates against the bytes autograd
really saves on small Qwen2 models, and the fit check the trainer runs before loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gvmrl.activation_checkpointing import enable_gradient_checkpointing
from gvmrl.batching import pack_sequences, token_logprobs
from gvmrl.cli import main
from gvmrl.config import ConfigError, load_config
from gvmrl.memory import (
    Shape,
    activation_bytes_per_token,
    count_parameters,
    kv_cache_bytes_per_token,
    load_model_config,
    plan_fits,
    plan_memory,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "qwen2.5-math-1.5b-grpo-gvm.yaml")


def test_qwen2_5_math_1_5b_parameter_count_by_hand():
    # embeddings (tied) V h; per layer q (h h + h), k and v (h 256 + 256 each, 2 KV heads of 128),
    # o (h h), MLP 3 h i, two norms 2 h; final norm h
    h, i, v, kv = 1536, 8960, 151936, 256
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    expected = v * h + 28 * layer + h
    assert expected == 1_543_714_304
    assert count_parameters(load_model_config("Qwen/Qwen2.5-Math-1.5B")) == expected


def test_meta_count_equals_a_built_model():
    config = Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    assert count_parameters(config) == sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())


def measured_bytes_per_token(model, autocast: bool) -> float:
    """Bytes autograd saves per extra token (slope between two lengths, so constants cancel),
    parameters excluded, each storage counted once."""

    def saved(length: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        batch = pack_sequences([[1] * 4] * 2, [[2] * (length - 4)] * 2, pad_id=0)
        context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            token_logprobs(model, batch, chunk_size=16)  # chunked as on a real vocabulary
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in params)

    return (saved(384) - saved(128)) / (2 * 256)


@pytest.mark.parametrize(
    "hidden,intermediate,layers,heads,kv_heads",
    [(128, 344, 2, 4, 2), (96, 512, 3, 6, 3), (192, 256, 2, 6, 6)],
)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_within_30_percent_of_measured(
    hidden, intermediate, layers, heads, kv_heads, checkpointing, autocast
):
    config = Qwen2Config(
        vocab_size=300, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    measured = measured_bytes_per_token(model, autocast)
    estimate = activation_bytes_per_token(
        Shape.of(config), param_bytes=4, compute_bytes=2 if autocast else 4,
        checkpointing=checkpointing,
    )  # fmt: skip
    assert abs(estimate - measured) <= 0.3 * measured, (estimate, measured)


def test_hf_engine_kv_cache_is_what_the_plan_counts(monkeypatch):
    """The bytes of the HF engine's cache buffers for R sequences against R x (longest prompt +
    max_new_tokens) x the plan's bytes per token, fp32 weights under bf16 autocast (the GPU
    default, where RoPE hands back fp32 keys)."""
    from gvmrl.builtin.model import builtin_tokenizer
    from gvmrl.rollout import hf
    from gvmrl.rollout.base import SamplingParams

    tokenizer = builtin_tokenizer()
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    largest: dict[int, int] = {}  # layer -> most bytes its buffers held
    select = hf._PreallocatedLayer.batch_select_indices

    def spy(layer, indices):
        select(layer, indices)
        held = layer._key_buffer.nbytes + layer._value_buffer.nbytes
        largest[id(layer)] = max(largest.get(id(layer), 0), held)

    monkeypatch.setattr(hf._PreallocatedLayer, "batch_select_indices", spy)
    prompts, samples, new_tokens = ["12+345=", "6*7="], [3, 2], 20
    engine = hf.HFEngine(model, tokenizer, max_batch_sequences=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.generate(prompts, samples, SamplingParams(max_new_tokens=new_tokens, seed=0))
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    per_token = kv_cache_bytes_per_token(Shape.of(config), compute_bytes=2)
    assert len(largest) == config.num_hidden_layers
    assert sum(largest.values()) == sum(samples) * (longest + new_tokens) * per_token


def test_preset_fits_one_h200_and_checkpointing_is_what_makes_the_micro_batch_fit():
    config = load_config(PRESET, check_environment=False)
    plan = plan_fits(config, 141)
    assert plan is not None and plan.update_peak <= plan.gpu_bytes
    assert plan.weights == 4 * plan.parameters and plan.optimizer == 8 * plan.parameters
    assert plan.vllm_during_update < plan.vllm_awake  # sleep mode gives the update the GPU
    # 65536 tokens per micro-batch: ~20 GiB with checkpointing, ~218 GiB (3.4 MiB per token)
    # without
    bigger = ["update.max_tokens_per_micro_batch=65536"]
    assert plan_fits(load_config(PRESET, bigger, check_environment=False), 141) is not None
    no_ckpt = load_config(
        PRESET, [*bigger, "gradient_checkpointing=false"], check_environment=False
    )
    with pytest.raises(ConfigError, match=r"^update\.max_tokens_per_micro_batch: .*at most \d+"):
        plan_fits(no_ckpt, 141)


def test_largest_micro_batch_is_the_boundary():
    config = load_config(PRESET, check_environment=False)
    largest = plan_memory(config, 80).largest_micro_batch_tokens
    fits = load_config(
        PRESET, [f"update.max_tokens_per_micro_batch={largest}"], check_environment=False
    )
    assert plan_fits(fits, 80) is not None
    over = load_config(
        PRESET, [f"update.max_tokens_per_micro_batch={largest + 64}"], check_environment=False
    )
    with pytest.raises(ConfigError):
        plan_fits(over, 80)


def test_seven_b_without_sleep_mode_does_not_fit():
    config = load_config(
        PRESET,
        ["model=Qwen/Qwen2.5-Math-7B", "rollout.vllm.enable_sleep_mode=false"],
        check_environment=False,
    )
    with pytest.raises(ConfigError):
        plan_fits(config, 141)


def test_hf_engine_batch_whose_cache_cannot_fit_names_rollout_batch_size():
    """HF engine, 2,048-token responses: 64 sequences' cache is 4.4 GiB; 2,048 sequences' is
    140 GiB, beyond an H200 next to the trainer's 20 GiB."""

    def hf_config(batch_size: int):
        settings = ["rollout.engine=hf", "rollout.max_new_tokens=2048"]
        settings.append(f"rollout.batch_size={batch_size}")
        return load_config(PRESET, settings, check_environment=False)

    plan = plan_fits(hf_config(64), 141)
    # 28 layers x (key + value) x 2 KV heads x 128 dims x 2 bytes per token, prompt planned 512
    assert plan is not None and plan.hf_kv_cache == 64 * (512 + 2048) * 28 * 2 * 2 * 128 * 2
    trainer = plan.weights + plan.optimizer + plan.reference
    assert plan.rollout_peak == trainer + plan.hf_kv_cache + 2 * 2**30  # and the allowance
    with pytest.raises(ConfigError, match=r"^rollout\.batch_size: the HF engine's KV cache"):
        plan_fits(hf_config(2048), 141)


def test_plan_command_prints_and_exits_2_when_it_cannot_fit(capsys, tmp_path):
    assert main(["plan", "--config", PRESET, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "largest update micro-batch" in out
    assert (tmp_path / "plan.json").is_file()
    code = main(["plan", "--config", PRESET, "--gpu-memory-gib", "24"])
    assert code == 2
    assert "gvmrl plan:" in capsys.readouterr().err


@pytest.mark.parametrize("device,asked", [("cuda", None), ("cuda:1", torch.device("cuda:1"))])
def test_the_plan_reads_the_memory_of_the_gpu_the_run_uses(monkeypatch, device, asked):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen = []

    def properties(gpu=None):
        seen.append(gpu)
        return SimpleNamespace(total_memory=141 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    config = load_config(PRESET, [f"device={device}", "rollout.engine=hf"], check_environment=False)
    assert plan_fits(config).gpu_bytes == 141 * 2**30 and seen == [asked]


def test_cpu_runs_are_not_planned():
    assert plan_fits(load_config(None, ["device=cpu"])) is None


def test_unknown_model_without_config_names_the_key():
    with pytest.raises(ConfigError, match="^model: no config"):
        load_model_config("someone/unknown-model")
