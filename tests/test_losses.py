"""Losses, advantages, KL and aggregation against hand-derived values and naive loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gvmrl.losses import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATION_MODES,
    aggregate,
    clipped_policy_loss,
    compute_advantages,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    raft_advantages,
    raft_loss,
    token_weights,
)

# ---------------------------------------------------------------------------------- advantages


def test_raft_advantages_clip_scores_at_zero():
    scores = torch.tensor([1.0, 0.0, -1.0, 0.5])
    torch.testing.assert_close(raft_advantages(scores), torch.tensor([1.0, 0.0, 0.0, 0.5]))


def _grpo_loop(scores, group_ids, scale_by_std, eps):
    """Obviously-correct reference: one group at a time with the statistics module."""
    out = []
    for score, gid in zip(scores, group_ids):
        group = [s for s, g in zip(scores, group_ids) if g == gid]
        if len(group) == 1:
            out.append(0.0)
            continue
        centred = score - statistics.fmean(group)
        out.append(centred / (statistics.stdev(group) + eps) if scale_by_std else centred)
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages_match_loop_with_unequal_groups(scale_by_std):
    gen = torch.Generator().manual_seed(0)
    # non-contiguous ids, interleaved, sizes 1, 2, 3, 7 as GVM allocation produces
    group_ids = torch.tensor([5, 9, 5, 2, 9, 9, 40] + [2] * 6)
    group_ids = group_ids[torch.randperm(len(group_ids), generator=gen)]
    scores = torch.randint(0, 2, (len(group_ids),), generator=gen).float()
    scores[0] += 0.25  # not only 0/1
    got = grpo_advantages(scores, group_ids, scale_by_std=scale_by_std, eps=1e-6)
    want = _grpo_loop(scores.tolist(), group_ids.tolist(), scale_by_std, 1e-6)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_grpo_advantages_hand_case():
    # group a = [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.7071 = +-0.7071
    # group b = [1, 1, 1]: all equal -> 0; group c = [1]: singleton -> 0
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    got = grpo_advantages(scores, group_ids, eps=0.0)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(got, torch.tensor([r, -r, 0.0, 0.0, 0.0, 0.0]))


def test_advantage_registry_by_name():
    scores = torch.tensor([2.0, 0.0, -2.0])
    group_ids = torch.tensor([0, 0, 0])
    # raft++: max(r, 0)
    torch.testing.assert_close(
        compute_advantages("raft++", scores, group_ids), torch.tensor([2.0, 0.0, 0.0])
    )
    # one group, mean 0, unbiased std sqrt((4 + 0 + 4) / 2) = 2: grpo divides by 2 + eps,
    # grpo-no-std only centres
    r = 2.0 / (2.0 + 1e-6)
    torch.testing.assert_close(
        compute_advantages("grpo", scores, group_ids), torch.tensor([r, 0.0, -r])
    )
    torch.testing.assert_close(
        compute_advantages("grpo-no-std", scores, group_ids), torch.tensor([2.0, 0.0, -2.0])
    )
    assert set(ADVANTAGE_ESTIMATORS) >= {"raft++", "grpo"}
    with pytest.raises(ValueError, match="known: raft\\+\\+, grpo"):
        compute_advantages("ppo", scores, group_ids)


# ----------------------------------------------------------------------------------- per-token


def test_raft_loss_is_masked_negative_logprob():
    logprobs = torch.tensor([[-1.0, -2.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(raft_loss(logprobs, mask), torch.tensor([[1.0, 2.0, 0.0]]))
    # RAFT: negative mean log-likelihood of the accepted tokens = (1 + 2) / 2
    loss = aggregate(raft_loss(logprobs, mask), token_weights(mask, "token-mean"))
    assert loss.item() == pytest.approx(1.5)


def _ppo_case(log_ratio: float, advantage: float, **kwargs):
    logprobs = torch.tensor([[log_ratio]], requires_grad=True)
    loss, metrics = clipped_policy_loss(
        logprobs, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kwargs
    )
    loss.sum().backward()
    return loss.item(), logprobs.grad.item(), metrics


def test_clipped_loss_positive_advantage_clipped_above():
    # ratio e ~ 2.718 > 1 + 0.2, A = 1: loss = max(-e, -1.2) = -1.2, clipped -> zero gradient
    loss, grad, metrics = _ppo_case(1.0, 1.0)
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0
    assert metrics["clipfrac"].item() == 1.0


def test_clip_higher_widens_upper_range():
    # ratio e^0.25 = 1.284: clipped at 1.2 with clip_high 0.2, free with clip_high 0.3
    loss, grad, metrics = _ppo_case(0.25, 1.0, clip_high=0.3)
    assert loss == pytest.approx(-math.exp(0.25), rel=1e-6)
    assert grad == pytest.approx(-math.exp(0.25), rel=1e-6)  # d(-A rho)/d logprob = -A rho
    assert metrics["clipfrac"].item() == 0.0
    assert _ppo_case(0.25, 1.0, clip_high=0.2)[0] == pytest.approx(-1.2)


def test_clipped_loss_inside_range_is_surrogate():
    # ratio e^-0.1 = 0.905 inside [0.8, 1.2], A = 2: loss = -2 * 0.905, grad = -2 * 0.905
    loss, grad, metrics = _ppo_case(-0.1, 2.0)
    assert loss == pytest.approx(-2 * math.exp(-0.1), rel=1e-6)
    assert grad == pytest.approx(-2 * math.exp(-0.1), rel=1e-6)
    # k3 approx_kl = (rho - 1) - log rho = (e^-0.1 - 1) + 0.1
    assert metrics["approx_kl"].item() == pytest.approx(math.exp(-0.1) - 1 + 0.1, rel=1e-5)


def test_dual_clip_caps_negative_advantage_loss():
    # ratio e^2 = 7.39, A = -1: max(7.39, 1.2) = 7.39 > cap 3 -> loss 3, zero gradient
    loss, grad, metrics = _ppo_case(2.0, -1.0)
    assert loss == pytest.approx(3.0)
    assert grad == 0.0
    assert metrics["dual_clipfrac"].item() == 1.0
    # without dual clip: loss = -A rho = e^2 and gradient -A rho = e^2
    loss, grad, metrics = _ppo_case(2.0, -1.0, dual_clip=None)
    assert loss == pytest.approx(math.exp(2.0), rel=1e-6)
    assert grad == pytest.approx(math.exp(2.0), rel=1e-6)
    assert metrics["dual_clipfrac"].item() == 0.0


def test_negative_advantage_clipped_below():
    # ratio e^-1 = 0.368 < 0.8, A = -1: max(0.368, 0.8) = 0.8, clipped -> zero gradient
    loss, grad, _ = _ppo_case(-1.0, -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo_case(0.0, 1.0, dual_clip=1.0)


def test_clipped_loss_masks_and_per_token_advantages():
    logprobs = torch.tensor([[0.0, 0.0, 50.0], [0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    per_token_adv = torch.tensor([[1.0, -2.0, 5.0], [3.0, 3.0, 3.0]])
    loss, metrics = clipped_policy_loss(logprobs, old, per_token_adv, mask)
    # ratio 1 on valid tokens: loss = -A; off-mask (even ratio e^50) exactly 0
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 2.0, 0.0], [-3.0, 0.0, 0.0]]))
    loss.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2].item() == 0.0 and logprobs.grad[1, 1].item() == 0.0
    assert metrics["clipfrac"].item() == 0.0 and metrics["ratio_mean"].item() == 1.0


def test_clipfrac_counts_masked_tokens_only():
    # tokens: ratio e^1 (clipped), ratio 1 (not), ratio e^1 but masked out -> clipfrac 1/2
    logprobs = torch.tensor([[1.0, 0.0, 1.0]])
    _, metrics = clipped_policy_loss(
        logprobs, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]])
    )
    assert metrics["clipfrac"].item() == pytest.approx(0.5)
    assert not metrics["clipfrac"].requires_grad


# ------------------------------------------------------------------------------------- KL, H


def test_kl_estimators_hand_values():
    # log pi - log pi_ref = l = 0.5: k1 = 0.5, k2 = 0.125, k3 = e^-0.5 - 1 + 0.5
    logprobs, ref = torch.tensor([[0.0]]), torch.tensor([[-0.5]])
    assert kl_penalty(logprobs, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logprobs, ref, "k2").item() == pytest.approx(0.125)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert kl_penalty(logprobs, ref, "k3").item() == pytest.approx(k3, rel=1e-6)
    assert kl_penalty(logprobs, ref, "low_var_kl").item() == pytest.approx(k3, rel=1e-6)


def test_k3_is_clamped_and_finite():
    # l = -30: exp(30) would be huge; the log-ratio is clamped to 20 and k3 to 10
    value = kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3")
    assert value.item() == 10.0


def test_kl_estimators_are_unbiased_or_not_as_documented():
    # Two categorical distributions; sample y ~ p exactly by enumerating with weights.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum().item()
    log_p, log_q = p.log().unsqueeze(0), q.log().unsqueeze(0)  # (1, 3): each "token" one outcome
    for kind, unbiased in [("k1", True), ("k3", True), ("k2", False)]:
        expectation = (p * kl_penalty(log_p, log_q, kind)[0]).sum().item()
        assert (expectation == pytest.approx(exact, rel=1e-5)) == unbiased, kind


def test_unknown_kl_kind_lists_known():
    with pytest.raises(ValueError, match="known: k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------------------------------------------------------------------------------- aggregation


def _aggregate_loop(per_token, mask, mode, group_ids):
    """Reference: nested Python means following each mode's definition."""
    seqs = [
        [v for v, m in zip(row, mrow) if m] for row, mrow in zip(per_token.tolist(), mask.tolist())
    ]
    if mode == "token-mean":
        tokens = [v for s in seqs for v in s]
        return sum(tokens) / len(tokens) if tokens else 0.0
    valid = [(s, g) for s, g in zip(seqs, group_ids.tolist()) if s]
    if not valid:
        return 0.0
    if mode == "seq-mean-token-sum":
        return statistics.fmean(sum(s) for s, _ in valid)
    if mode == "seq-mean-token-mean":
        return statistics.fmean(statistics.fmean(s) for s, _ in valid)
    groups: dict[int, list[float]] = {}
    for s, g in valid:
        groups.setdefault(g, []).append(statistics.fmean(s))
    return statistics.fmean(statistics.fmean(v) for v in groups.values())


def _random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, t = 9, 6
    per_token = torch.randn(n, t, generator=gen)
    mask = torch.rand(n, t, generator=gen) < 0.6
    mask[3] = False  # a sequence with no response token
    group_ids = torch.tensor([7, 7, 7, 1, 1, 4, 4, 4, 4])  # prompt 1 keeps one valid sample
    return per_token, mask, group_ids


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_loop(mode, seed):
    per_token, mask, group_ids = _random_batch(seed)
    got = aggregate(per_token, token_weights(mask, mode, group_ids))
    assert got.item() == pytest.approx(_aggregate_loop(per_token, mask, mode, group_ids), rel=1e-5)


def test_prompt_mean_weights_each_prompt_equally():
    # prompt 0 has 3 one-token samples of loss 1, prompt 1 one sample of loss 4:
    # token-mean = (1+1+1+4)/4 = 1.75, prompt-mean = (1 + 4)/2 = 2.5
    per_token = torch.tensor([[1.0], [1.0], [1.0], [4.0]])
    mask = torch.ones(4, 1)
    group_ids = torch.tensor([0, 0, 0, 1])
    assert aggregate(per_token, token_weights(mask, "token-mean")).item() == pytest.approx(1.75)
    prompt_mean = aggregate(per_token, token_weights(mask, "prompt-mean", group_ids))
    assert prompt_mean.item() == pytest.approx(2.5)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_weight_sums(mode):
    _, mask, group_ids = _random_batch(0)
    total = token_weights(mask, mode, group_ids).sum().item()
    lengths = mask.sum(-1).float()
    expected = lengths[lengths > 0].mean().item() if mode == "seq-mean-token-sum" else 1.0
    assert total == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batches_reproduce_mini_batch_loss_and_gradient(mode):
    per_token, mask, group_ids = _random_batch(3)
    params = per_token.clone().requires_grad_(True)
    full = aggregate(params, token_weights(mask, mode, group_ids))
    (full_grad,) = torch.autograd.grad(full, params)

    weights = token_weights(mask, mode, group_ids)  # once per mini-batch, sliced per micro-batch
    params.grad = None
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 9)):  # uneven split, one holds the empty row
        micro = aggregate(params[rows], weights[rows])
        micro.backward()
        total += micro.item()
    assert total == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(params.grad, full_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pytest --gpu")
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_weights_of_a_gpu_mask_take_group_ids_from_the_cpu(mode):
    """The trainer keeps group ids on the CPU beside a GPU batch; CUDA kernels, unlike CPU ones,
    refuse an index on another device."""
    per_token, mask, group_ids = _random_batch(4)
    weights = token_weights(mask.cuda(), mode, group_ids)
    assert weights.device.type == "cuda"
    torch.testing.assert_close(weights.cpu(), token_weights(mask, mode, group_ids))


def test_aggregation_edge_cases():
    per_token = torch.tensor([[2.0, float("nan")]])
    mask = torch.tensor([[1, 0]])
    for mode in AGGREGATION_MODES:  # off-mask NaN ignored
        assert aggregate(per_token, token_weights(mask, mode, torch.tensor([0]))).item() == 2.0
    # bf16 loss, weights 1/3: summed in float32 it is exactly 1 (bf16 weights would give 1.002)
    bf16_loss = torch.ones(1, 3, dtype=torch.bfloat16)
    low_precision = aggregate(bf16_loss, token_weights(torch.ones(1, 3), "token-mean"))
    assert low_precision.dtype == torch.float32
    assert low_precision.item() == pytest.approx(1.0, abs=1e-6)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    empty_weights = token_weights(empty, "prompt-mean", torch.tensor([0, 1]))
    assert aggregate(torch.ones(2, 3), empty_weights).item() == 0.0
    with pytest.raises(ValueError, match="needs group_ids"):
        token_weights(mask, "prompt-mean")
    with pytest.raises(ValueError, match="known: token-mean"):
        token_weights(mask, "sum")


def test_masked_mean_empty_mask_is_zero():
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0
    assert masked_mean(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([1, 1, 0])).item() == 2.0
