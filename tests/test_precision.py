"""fp32 master weights with bf16 compute: AdamW at lr 1e-6 moves them; bf16 weights do not."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gvmrl.precision import changed_share_after_step, resolve_precision


def _model(dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype)


def changed_share_after_one_step(param_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    """Share of q_proj's elements that one AdamW step at lr 1e-6 changes."""
    model = _model(param_dtype)
    precision = resolve_precision(
        str(param_dtype).removeprefix("torch."), str(compute_dtype).removeprefix("torch."), "cpu"
    )
    input_ids = torch.randint(1, 97, (4, 26), generator=torch.Generator().manual_seed(1))
    weight = model.model.layers[0].self_attn.q_proj.weight
    return changed_share_after_step(model, precision, input_ids, weight, lr=1e-6)


def test_fp32_master_weights_with_bf16_compute_move_at_lr_1e6():
    precision = resolve_precision("float32", "bfloat16", "cpu")
    assert precision.autocast() is not None and precision.compute_dtype == torch.bfloat16
    # the forward really ran in bf16: autocast's matmuls give bf16 outputs
    model = _model(torch.float32)
    with precision.autocast():
        hidden = model.model.layers[0].self_attn.q_proj(torch.randn(2, 128))
    assert hidden.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert changed_share_after_one_step(torch.float32, torch.bfloat16) > 0.99


def test_bf16_weights_barely_move_at_lr_1e6():
    # the contrast: Adam's first step is ~lr per element, far below half a bf16 ulp of 0.02
    assert changed_share_after_one_step(torch.bfloat16, torch.bfloat16) < 0.05


def test_resolve_precision_defaults():
    cpu = resolve_precision("auto", "auto", "cpu")
    assert (cpu.param_dtype, cpu.compute_dtype) == (torch.float32, torch.float32)  # as before
    cuda = resolve_precision("auto", "auto", "cuda")
    assert (cuda.param_dtype, cuda.compute_dtype) == (torch.float32, torch.bfloat16)
    assert cuda.rollout_dtype == "bfloat16"
    bf16 = resolve_precision("bfloat16", "auto", "cuda")
    assert (bf16.param_dtype, bf16.compute_dtype) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype"):
        resolve_precision("bfloat16", "float32", "cuda")
