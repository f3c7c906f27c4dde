"""per_sample_grad_norms against one backward per sample; prompt_stats against a Python loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gvmrl.batching import pack_sequences
from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer
from gvmrl.estimation import (
    PromptStats,
    per_sample_grad_norms,
    prompt_stats,
    resolve_parameter_group,
)

PAD = 0


def tiny_qwen2(
    tied: bool, dtype: torch.dtype, vocab_size: int = 13, seed: int = 0
) -> Qwen2ForCausalLM:
    """2-layer random Qwen2; a small vocabulary makes repeated tokens common."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    with (
        torch.no_grad()
    ):  # larger weights than the default init: less uniform softmax, bigger norms
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def random_rows(
    vocab_size: int, count: int, seed: int
) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """Prompts, responses (token 0 = PAD included on purpose) and response weights with gaps."""
    rng = np.random.default_rng(seed)
    prompts, responses, weights = [], [], []
    for _ in range(count):
        prompts.append(rng.integers(0, vocab_size, rng.integers(1, 6)).tolist())
        length = int(rng.integers(0, 9))
        responses.append(rng.integers(0, vocab_size, length).tolist())
        weights.append((rng.random(length) > 0.25).astype(float).tolist())  # gaps
    return prompts, responses, weights


def batch_tensors(prompts, responses, weights, padding_side):
    batch = pack_sequences(prompts, responses, pad_id=PAD, padding_side=padding_side)
    mask = batch.response_mask.clone()
    for n, w in enumerate(weights):
        positions = torch.nonzero(batch.response_mask[n]).flatten()
        mask[n, positions] = torch.tensor(w, dtype=mask.dtype)
    return batch.input_ids, batch.attention_mask, mask


def naive_norms(model, prompts, responses, weights, select) -> list[float]:
    """One unpadded forward and one autograd.grad per sample, as the GVM reference does."""
    group = {id(p): p for name, p in model.named_parameters(remove_duplicate=False) if select(name)}
    params = list(group.values())
    norms = []
    for prompt, response, weight in zip(prompts, responses, weights):
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        loss = sum(
            -w * logp[len(prompt) + k - 1, token]
            for k, (token, w) in enumerate(zip(response, weight))
            if len(prompt) + k >= 1
        )
        if not torch.is_tensor(loss):
            norms.append(0.0)
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None)))
    return norms


SELECTORS = {
    "embed_tokens": lambda name: "embed_tokens" in name,
    "lm_head": lambda name: "lm_head" in name,
    "both": lambda name: "embed_tokens" in name or "lm_head" in name,
}


FLOAT64_CASES = [
    (torch.float64, 1e-4, tied, group, side)
    for tied in (True, False)
    for group in ("embed_tokens", "lm_head", "both")
    for side in ("left", "right")
]
FLOAT32_CASES = [
    (torch.float32, 1e-3, True, "embed_tokens", "left"),
    (torch.float32, 1e-3, False, "both", "right"),
    (torch.float32, 1e-3, False, "lm_head", "left"),
]


@pytest.mark.parametrize("dtype,rtol,tied,group,padding_side", FLOAT64_CASES + FLOAT32_CASES)
def test_matches_one_backward_per_sample(dtype, rtol, tied, group, padding_side):
    model = tiny_qwen2(tied, dtype)
    prompts, responses, weights = random_rows(model.config.vocab_size, 6, seed=1)
    params = {"embed_tokens": "embed_tokens", "lm_head": ["lm_head"], "both": SELECTORS["both"]}[
        group
    ]
    ids, attention, mask = batch_tensors(prompts, responses, weights, padding_side)
    # small chunks and micro-batches force several vocabulary chunks and passes
    got = per_sample_grad_norms(
        model, ids, attention, mask, params, micro_batch_size=3, max_chunk_elements=40
    )
    expected = naive_norms(model, prompts, responses, weights, SELECTORS[group])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (6,)
    assert any(e > 0 for e in expected)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol, atol=1e-9)


def test_builtin_architecture_tied_embeddings():
    torch.manual_seed(0)
    config = builtin_model_config(builtin_tokenizer())
    model = Qwen2ForCausalLM(config).double()
    prompts, responses, weights = random_rows(20, 4, seed=3)  # ids < 20 include the pad id 0
    ids, attention, mask = batch_tensors(prompts, responses, weights, "left")
    got = per_sample_grad_norms(model, ids, attention, mask)
    expected = naive_norms(model, prompts, responses, weights, SELECTORS["embed_tokens"])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_hand_derived_output_layer_norm():
    """One predicted token, uniform softmax: G = (p - e_y) h^T, so ||G|| = ||p - e_y|| * ||h||."""
    model = tiny_qwen2(False, torch.float64, vocab_size=5)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 -> p = 1/5 everywhere
    ids = torch.tensor([[3, 4]])
    ones = torch.ones_like(ids)
    got = per_sample_grad_norms(model, ids, ones, torch.tensor([[0.0, 2.0]]), "lm_head")
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, 0]
    # p - e_y = (0.2, 0.2, 0.2, 0.2, -0.8): squared norm 4 * 0.04 + 0.64 = 0.8; weight 2 doubles G
    assert float(got.detach()) == pytest.approx(
        2 * math.sqrt(0.8) * float(hidden.norm()), rel=1e-10
    )


def test_empty_response_and_state_restored():
    model = tiny_qwen2(True, torch.float64)
    model.train()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ones = torch.ones_like(ids)
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    got = per_sample_grad_norms(model, ids, ones, mask)
    assert got[0] == 0 and got[1] > 0
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_parameter_groups():
    tied, untied = tiny_qwen2(True, torch.float32), tiny_qwen2(False, torch.float32)
    assert resolve_parameter_group(tied, "lm_head").tied  # the shared matrix, under either name
    group = resolve_parameter_group(untied, "lm_head")
    assert group.output_side and not group.input_side and not group.tied
    assert resolve_parameter_group(untied, lambda name: name.startswith("model.embed")).input_side
    with pytest.raises(ValueError, match="exact batched"):
        resolve_parameter_group(untied, "layers.0")
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_parameter_group(untied, "nonexistent")
    with pytest.raises(ValueError, match="substrings"):
        resolve_parameter_group(untied, [])


def naive_prompt_stats(group_ids, scores, norms, threshold):
    out = {}
    for g, s, n in zip(group_ids, scores, norms):
        entry = out.setdefault(g, [0, 0, 0.0])
        entry[0] += 1
        if s >= threshold:
            entry[1] += 1
            entry[2] += n
    return {g: (a / n, (total / a if a else 0.0), n, a) for g, (n, a, total) in out.items()}


def test_prompt_stats_matches_loop():
    rng = np.random.default_rng(0)
    group_ids = [f"p{k}" for k in rng.integers(0, 6, 40)]
    scores = rng.integers(0, 2, 40).astype(float)
    norms = np.where(scores > 0, rng.random(40) * 3, np.nan)  # rejected samples carry NaN
    stats = prompt_stats(group_ids, scores, norms)
    expected = naive_prompt_stats(group_ids, scores, norms, 0.5)
    assert stats.prompt_ids == list(dict.fromkeys(group_ids))
    for i, g in enumerate(stats.prompt_ids):
        p, mean_norm, n, a = expected[g]
        assert stats.accept_rate[i] == pytest.approx(p)
        assert stats.grad_norm[i] == pytest.approx(mean_norm)
        assert (stats.num_samples[i], stats.num_accepted[i]) == (n, a)


def test_prompt_stats_hand_case_and_errors():
    stats = prompt_stats(
        [7, 7, 7, 9], [1.0, 0.0, 1.0, -1.0], [2.0, float("nan"), 4.0, float("nan")]
    )
    assert isinstance(stats, PromptStats)
    assert stats.rows() == [
        {
            "prompt_id": 7,
            "accept_rate": 2 / 3,
            "grad_norm": 3.0,
            "num_samples": 3,
            "num_accepted": 2,
        },
        {"prompt_id": 9, "accept_rate": 0.0, "grad_norm": 0.0, "num_samples": 1, "num_accepted": 0},
    ]
    ids_from_numpy = prompt_stats(
        np.array([3, 1, 3]), [1.0, 1.0, 0.0], [1.0, 2.0, np.nan]
    ).prompt_ids
    assert ids_from_numpy == [3, 1] and all(type(i) is int for i in ids_from_numpy)
    # GRPO-style rewards: accepted when score >= threshold
    assert (
        prompt_stats(["a", "a"], [0.5, -0.5], [1.0, 0.0], accept_threshold=0.5).num_accepted[0] == 1
    )
    with pytest.raises(ValueError, match="finite"):
        prompt_stats(["a"], [1.0], [float("nan")])
    with pytest.raises(ValueError, match="finite"):
        prompt_stats(["a"], [1.0], [-1.0])


def test_prompt_stats_averages_the_measured_subset():
    # prompt 7: three accepted, norms measured for two (2 and 6) -> G = 4, p = 3/4
    nan = float("nan")
    stats = prompt_stats([7, 7, 7, 7], [1.0, 1.0, 0.0, 1.0], [2.0, nan, nan, 6.0])
    assert stats.grad_norm[0] == 4.0 and stats.accept_rate[0] == 0.75
    assert stats.num_accepted[0] == 3
    with pytest.raises(ValueError, match="one length"):
        prompt_stats(["a", "b"], [1.0], [1.0])
