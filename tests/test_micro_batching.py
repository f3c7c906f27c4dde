"""Micro-batching by a token budget and gradient checkpointing change memory, never the result:
the same gradient as the full batch, the same per-sample gradient norms in any micro-batching."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gvmrl.activation_checkpointing import enable_gradient_checkpointing, is_gradient_checkpointing
from gvmrl.batching import (
    micro_batches_by_tokens,
    pack_sequences,
    plan_micro_batches,
    sweep_logprobs,
    token_budget_rows,
    token_logprobs,
)
from gvmrl.estimation import per_sample_grad_norms
from gvmrl.losses import clipped_policy_loss, token_weights

VOCAB = 61


def tiny_qwen2(dtype=torch.float64, layers: int = 2) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype)


def random_batch(lengths: list[tuple[int, int]], seed: int = 1, padding_side: str = "right"):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(1, VOCAB, (r,), generator=g).tolist() for _, r in lengths]
    return pack_sequences(prompts, responses, pad_id=0, padding_side=padding_side)


LENGTHS = [(3, 9), (5, 2), (2, 17), (4, 4), (6, 11), (3, 1), (2, 6)]


def test_token_budget_rows_by_hand():
    # longest first: 20 (alone: 2 x 20 > 30), then 12, 10 (2 x 12 = 24 <= 30; 3 x 12 > 30), ...
    assert token_budget_rows([10, 20, 12, 3, 5], 30) == [[1], [2, 0], [4, 3]]
    assert token_budget_rows([50], 8) == [[0]]  # a row longer than the budget goes alone
    with pytest.raises(ValueError):
        token_budget_rows([3], 0)


@pytest.mark.parametrize("budget", [1, 17, 30, 64, 1000])
def test_token_budget_rows_cover_each_row_once_within_budget(budget):
    lengths = [p + r for p, r in LENGTHS]
    groups = token_budget_rows(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= budget or len(group) == 1


def _policy_gradient(model, batch, plan) -> torch.Tensor:
    """Gradient of the token-mean clipped loss accumulated over `plan`'s micro-batches, with token
    weights computed over the whole batch (as the trainer's update does)."""
    model.zero_grad(set_to_none=True)
    weights = token_weights(batch.response_mask, "token-mean")
    g = torch.Generator().manual_seed(5)
    old = torch.randn(batch.input_ids.shape, generator=g, dtype=torch.float64) * 0.1 - 2.0
    advantages = torch.randn(len(batch), generator=g, dtype=torch.float64)
    for rows, micro in plan:
        width = micro.input_ids.shape[1]
        logp = token_logprobs(model, micro)
        per_token, _ = clipped_policy_loss(
            logp, old[rows, :width], advantages[rows], micro.response_mask
        )
        (per_token * weights[rows, :width]).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_token_budget_micro_batching_gives_the_full_batch_gradient():
    model = tiny_qwen2()
    batch = random_batch(LENGTHS)
    full = _policy_gradient(model, batch, [(slice(None), batch)])
    for budget in (1, 24, 40):
        plan = list(plan_micro_batches(batch, size=128, max_tokens=budget))
        assert len(plan) > 1
        assert all(m.input_ids.shape[1] == int(m.attention_mask.sum(1).max()) for _, m in plan)
        torch.testing.assert_close(
            _policy_gradient(model, batch, plan), full, rtol=1e-9, atol=1e-12
        )


def test_micro_batches_are_trimmed_to_their_own_longest_row():
    batch = random_batch(LENGTHS)
    for rows, micro in micro_batches_by_tokens(batch, 30):
        lengths = batch.attention_mask[rows].sum(1)
        assert micro.input_ids.shape == (len(rows), int(lengths.max()))
        torch.testing.assert_close(micro.input_ids, batch.input_ids[rows, : int(lengths.max())])


def test_sweep_logprobs_equal_one_full_batch_pass():
    model = tiny_qwen2()
    batch = random_batch(LENGTHS)
    with torch.no_grad():
        full = token_logprobs(model, batch).float()
    for size, budget in ((2, None), (128, 25)):
        torch.testing.assert_close(
            sweep_logprobs(model, batch, size=size, max_tokens=budget), full, rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("params", ["embed_tokens", "lm_head"])
def test_grad_norm_stage_gives_the_same_norms_in_any_micro_batching(padding_side, params):
    model = tiny_qwen2()
    batch = random_batch(LENGTHS, padding_side=padding_side)
    args = (model, batch.input_ids, batch.attention_mask, batch.response_mask, params)
    reference = per_sample_grad_norms(*args, micro_batch_size=len(batch))
    # one backward per sample on its unpadded sequence: the independent check of the reference
    for b in (0, 2):
        real = batch.attention_mask[b].bool()
        ids = batch.input_ids[b][real][None]
        mask = batch.response_mask[b][real][None]
        model.zero_grad(set_to_none=True)
        logp = token_logprobs(model, pack_sequences([ids[0].tolist()], [[]], 0))
        (-(logp * mask).sum()).backward()
        weight = (
            model.get_input_embeddings() if params == "embed_tokens" else model.lm_head
        ).weight
        torch.testing.assert_close(reference[b], weight.grad.norm(), rtol=1e-8, atol=1e-10)
    for size, budget in ((1, None), (3, None), (None, 20), (2, 40), (None, 10_000)):
        norms = per_sample_grad_norms(
            *args, micro_batch_size=size, max_tokens_per_micro_batch=budget
        )
        torch.testing.assert_close(norms, reference, rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_gradient():
    plain = tiny_qwen2()
    checkpointed = tiny_qwen2()
    enable_gradient_checkpointing(checkpointed)
    assert is_gradient_checkpointing(checkpointed) and not is_gradient_checkpointing(plain)
    batch = random_batch(LENGTHS)
    checkpointed.train()
    plain.train()
    grads = [_policy_gradient(m, batch, [(slice(None), batch)]) for m in (plain, checkpointed)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
