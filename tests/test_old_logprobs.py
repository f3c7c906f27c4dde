"""pi_old recomputed with the training model vs the rollout's log-probs, and the TIS weight."""

from __future__ import annotations

import math

import pytest
import torch
from test_rollout import tiny_model

from gvmrl.batching import pack_sequences, sweep_logprobs
from gvmrl.builtin.model import builtin_tokenizer
from gvmrl.losses import clipped_policy_loss, truncated_importance_weights
from gvmrl.rollout import SamplingParams, make_engine


def test_tis_weights_by_hand():
    # pi_old / pi_rollout: 0.5 / 0.25 = 2 -> capped at 1.5; 0.2 / 0.4 = 0.5 stays; masked -> 0
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    rollout = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights = truncated_importance_weights(old, rollout, mask, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    # weighting a per-token loss: rho = 1 (pi_theta = pi_old), A = 1 -> loss -1 per token, times w
    loss, _ = clipped_policy_loss(old, old, torch.tensor([1.0]), mask)
    torch.testing.assert_close((loss * weights).sum(), torch.tensor(-2.0))
    with pytest.raises(ValueError):
        truncated_importance_weights(old, rollout, mask, cap=0.0)


def test_tis_weight_has_no_gradient():
    old = torch.tensor([[-1.0]], requires_grad=True)
    assert not truncated_importance_weights(
        old, torch.tensor([[-2.0]]), torch.ones(1, 1), 3.0
    ).requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_pi_old_equals_hf_rollout_logprobs_and_gives_the_same_loss(temperature):
    tokenizer = builtin_tokenizer()
    model = tiny_model(tokenizer)  # the rollout tests' random 2-layer Qwen2
    engine = make_engine("hf", model, tokenizer)
    samples = engine.generate(
        ["1+2=", "(3*4)-5="],
        [3, 2],
        SamplingParams(temperature=temperature, max_new_tokens=12, seed=3),
    )
    batch = pack_sequences(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], tokenizer.pad_token_id
    )
    rollout = torch.zeros(batch.response_mask.shape)
    for j, s in enumerate(samples):
        rollout[j, len(s.prompt_ids) : len(s.prompt_ids) + len(s.logprobs)] = torch.tensor(
            s.logprobs
        )
    recomputed = sweep_logprobs(model, batch, size=2, max_tokens=40, temperature=temperature)
    mask = batch.response_mask
    torch.testing.assert_close(recomputed * mask, rollout, rtol=1e-4, atol=1e-4)
    advantages = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    logp = recomputed + 0.05 * mask  # a policy that moved a little since sampling
    losses = [
        float((clipped_policy_loss(logp, old, advantages, mask)[0]).sum())
        for old in (recomputed, rollout)
    ]
    assert math.isclose(losses[0], losses[1], rel_tol=1e-4, abs_tol=1e-5)
    weights = truncated_importance_weights(recomputed, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, mask, rtol=1e-3, atol=1e-3)  # same engine: weight 1
