"""Losses, advantages, KL estimators and loss aggregation for RAFT, RAFT++ and GRPO (pure torch).

Everything here is a function of tensors: no model, no I/O, no globals. The training loop
computes per-token log-probs, calls one advantage estimator and one per-token loss, adds an
optional KL term, and reduces with `aggregate`.

Dimensions: `N` sequences in the (mini-)batch, `T` token positions, `V` vocabulary size.
`response_mask` is `(N, T)` bool or float, 1 where the token is a response token whose
log-prob is trained, 0 on prompt and padding. `group_ids` is `(N,)` integer, equal for samples
of the same prompt; ids need not be contiguous and groups may have different sizes (GVM gives
prompt `i` its own `n_i`).

Conventions follow verl's `core_algos.py` (the GVM paper's code is a verl fork): a per-token
loss is `(N, T)` and zero off the mask; reduction is a separate step with named modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Log-ratios are clamped before `exp` so padded or far-off-policy positions stay finite
# (verl clamps to the same range). Beyond +-20 the token is clipped anyway.
_LOG_RATIO_CLAMP = 20.0
# The k3 estimate is clamped to [-10, 10] as in verl's `low_var_kl`, bounding one bad token's pull.
_K3_CLAMP = 10.0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over positions where `mask` is nonzero; 0 when the mask is empty.

    values: any shape; mask: same shape (bool or 0/1 float). Returns a 0-dim tensor. The one
    helper for masked means, so "no valid token" is handled the same way everywhere.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Advantages


def raft_advantages(scores: Tensor) -> Tensor:
    """Per-sequence RAFT/RAFT++ weights: the score clipped at 0, `A_j = max(r_j, 0)`.

    RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning") trains only on accepted samples;
    RAFT++ (Xiong et al. 2025, arXiv 2504.11343; used by GVM, arXiv 2505.02391) keeps that
    selection and adds PPO-style importance clipping. With 0/1 correctness scores `A_j = r_j`,
    so rejected samples get advantage 0 and contribute no gradient through the clipped surrogate.

    scores: (N,) float. Returns (N,) float.
    """
    return scores.float().clamp(min=0.0)


def grpo_advantages(
    scores: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages of GRPO (DeepSeekMath, Shao et al. 2024, Sec. 4.1.2).

        A_j = (r_j - mean_g) / (std_g + eps)    for j in group g (outcome supervision)
        A_j =  r_j - mean_g                      if not scale_by_std (Dr. GRPO, Liu et al. 2025)

    `std_g` is the unbiased (Bessel-corrected, divide by n_g - 1) standard deviation, as
    `torch.std` in verl and TRL computes it, so numbers match the paper's verl-based code.
    Groups may have different sizes; a group of one sample has no spread to compare against and
    gets advantage 0 (verl would give it the raw score, which biases singletons GVM creates).
    A group whose samples all score the same also gets 0.

    scores: (N,) float; group_ids: (N,) integer, one id per prompt. Returns (N,) float.
    """
    scores = scores.float()
    _, group_index = torch.unique(group_ids, return_inverse=True)  # (N,) in 0..G-1
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    counts.index_add_(0, group_index, torch.ones_like(scores))  # (G,)
    sums = torch.zeros_like(counts).index_add_(0, group_index, scores)  # (G,)
    centred = scores - (sums / counts)[group_index]  # (N,)
    if not scale_by_std:
        return centred
    squares = torch.zeros_like(counts).index_add_(0, group_index, centred.square())  # (G,)
    std = (squares / (counts - 1).clamp(min=1.0)).sqrt()  # (G,) unbiased
    denominator = std[group_index] + eps  # (N,)
    defined = (counts[group_index] > 1) & (denominator > 0)  # eps = 0 and equal scores: 0, not NaN
    return torch.where(defined, centred / denominator, torch.zeros_like(centred))


def _raft_plus_plus_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    return raft_advantages(scores)


def _grpo_no_std_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    return grpo_advantages(scores, group_ids, scale_by_std=False)


# algorithm name -> estimator(scores (N,), group_ids (N,)) -> advantages (N,)
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "raft++": _raft_plus_plus_advantages,
    "grpo": grpo_advantages,
    "grpo-no-std": _grpo_no_std_advantages,
}


def compute_advantages(estimator: str, scores: Tensor, group_ids: Tensor) -> Tensor:
    """Look up `ADVANTAGE_ESTIMATORS[estimator]` and apply it; unknown names raise ValueError."""
    return _lookup(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")(scores, group_ids)


# ----------------------------------------------------------------------------------------------
# Per-token losses


def raft_loss(logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood of RAFT (Dong et al. 2023, Alg. 1, fine-tuning step).

        loss_{j,t} = -log pi_theta(y_{j,t} | x_j, y_{j,<t}) * mask_{j,t}

    Pass only accepted samples (or fold acceptance into the mask): RAFT is supervised
    fine-tuning on the samples the verifier accepts. Reduce with `aggregate`.

    logprobs: (N, T) log-probs of the sampled tokens under the current policy.
    response_mask: (N, T), 1 on trained response tokens. Returns (N, T), 0 off the mask.
    """
    return torch.where(response_mask.bool(), -logprobs, torch.zeros_like(logprobs))


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate of PPO, used by RAFT++ and GRPO.

    With ratio rho = exp(logprobs - old_logprobs) and advantage A (Schulman et al. 2017, Eq. 7):

        L_clip = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))

    Separate `clip_low`/`clip_high` are the "clip-higher" of DAPO (Yu et al. 2025): a larger
    upper range lets low-probability tokens with A > 0 grow. Dual-clip (Ye et al. 2020,
    "Mastering Complex Control in MOBA Games with Deep RL") caps the loss for A < 0, where a huge
    ratio would otherwise give an unbounded loss:

        L = min(L_clip, -dual_clip * A)   if A < 0,    L = L_clip otherwise.

    RAFT++ (arXiv 2504.11343, 2505.02391) is this loss with A = max(r, 0); GRPO (DeepSeekMath,
    Eq. 3) is this loss with group-normalised A. Clipped tokens get zero gradient.

    logprobs: (N, T) log-probs of the sampled tokens under the policy being trained.
    old_logprobs: (N, T) log-probs under the policy that sampled them (no gradient).
    advantages: (N,) per sequence, or (N, T) per token.
    response_mask: (N, T), 1 on trained response tokens.
    clip_low, clip_high: ratio range [1 - clip_low, 1 + clip_high]. dual_clip: constant c > 1,
    or None to disable.

    Returns (loss (N, T), 0 off the mask; metrics), with 0-dim detached masked token means:
    `clipfrac` (share of tokens where the clipped branch is active), `dual_clipfrac` (share of
    tokens where the dual-clip cap is active), `approx_kl` (k3 estimate of KL(old || new),
    Schulman 2020), `ratio_mean`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c*A for A < 0): {dual_clip}")
    mask = response_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (N, 1), broadcasts over T
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # (N, T)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio  # (N, T)
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_active = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_active, cap.expand_as(loss), loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "dual_clipfrac": masked_mean(dual_active.float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def truncated_importance_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, cap: float
) -> Tensor:
    """Truncated importance sampling (TIS) for a sampler that is not the trained policy.

    vLLM samples with its own kernels in bf16, so its token probabilities pi_rollout differ from
    the training engine's pi_old even at equal weights. Yao et al. 2025 ("Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"; verl's `tis_imp_ratio_cap`) reweight
    each token's policy loss by

        w_t = min(exp(log pi_old(y_t) - log pi_rollout(y_t)), cap)

    with pi_old recomputed by the training model (`loss.old_logprobs: recompute`); the truncation
    bounds the variance a rare token would add. The weight carries no gradient: multiply the
    per-token loss (e.g. of `clipped_policy_loss`) by it before aggregation.

    old_logprobs: (N, T) pi_old under the training model; rollout_logprobs: (N, T) the sampler's;
    response_mask: (N, T), 1 on trained tokens; cap: C > 0.
    Returns (N, T) detached weights, 0 off the mask.
    """
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(max=_LOG_RATIO_CLAMP)
    weights = log_ratio.exp().clamp(max=cap)
    return torch.where(response_mask.bool(), weights, torch.zeros_like(weights))


# ----------------------------------------------------------------------------------------------
# KL to the reference policy


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: Tensor) -> Tensor:
    reverse = (-log_ratio).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # log(pi_ref / pi_theta)
    return (reverse.exp() - reverse - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)


# estimator name -> f(log pi_theta - log pi_ref) per token; aliases are verl's config names.
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
    "kl": _kl_k1,
    "mse": _kl_k2,
    "low_var_kl": _kl_k3,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens (Schulman 2020,
    "Approximating KL Divergence"). With l = log pi_theta(y) - log pi_ref(y) and y ~ pi_theta:

        k1 = l                           unbiased, high variance, can be negative
        k2 = l^2 / 2                     biased, low variance, >= 0
        k3 = exp(-l) - 1 + l             unbiased, low variance, >= 0 ("low_var_kl"), clamped to
                                         [-10, 10] as verl does so one token cannot dominate

    Aliases `kl`, `mse`, `low_var_kl` are verl's names for k1, k2, k3. Multiply by the KL
    coefficient and reduce with `aggregate` (mask applied there).

    logprobs, ref_logprobs: (N, T). Returns (N, T). Unknown `kind` raises ValueError.
    """
    estimator = _lookup(KL_ESTIMATORS, kind, "KL estimator")
    return estimator(logprobs - ref_logprobs)


# ----------------------------------------------------------------------------------------------
# Aggregation


def _token_mean_weights(mask: Tensor, group_index: Tensor | None) -> Tensor:
    return mask / mask.sum().clamp(min=1.0)


def _valid_sequence_count(lengths: Tensor) -> Tensor:
    return (lengths > 0).sum().clamp(min=1).to(lengths.dtype)


def _seq_mean_token_sum_weights(mask: Tensor, group_index: Tensor | None) -> Tensor:
    lengths = mask.sum(dim=-1)  # (N,)
    return mask / _valid_sequence_count(lengths)


def _seq_mean_token_mean_weights(mask: Tensor, group_index: Tensor | None) -> Tensor:
    lengths = mask.sum(dim=-1, keepdim=True)  # (N, 1)
    return mask / lengths.clamp(min=1.0) / _valid_sequence_count(lengths)


def _prompt_mean_weights(mask: Tensor, group_index: Tensor | None) -> Tensor:
    if group_index is None:
        raise ValueError("aggregation mode 'prompt-mean' needs group_ids (one id per prompt)")
    lengths = mask.sum(dim=-1)  # (N,)
    valid = (lengths > 0).to(mask.dtype)  # (N,)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    group_sizes = torch.zeros(num_groups, dtype=mask.dtype, device=mask.device)
    group_sizes.index_add_(0, group_index, valid)  # (G,) |D_i|, sequences with a token
    valid_groups = (group_sizes > 0).sum().clamp(min=1).to(mask.dtype)
    per_sequence = valid / lengths.clamp(min=1.0) / group_sizes[group_index].clamp(min=1.0)  # (N,)
    return mask * (per_sequence / valid_groups).unsqueeze(-1)


# mode -> weights(mask (N,T) float, group index (N,) in 0..G-1 or None) -> (N,T)
_AGGREGATION_WEIGHTS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "token-mean": _token_mean_weights,
    "seq-mean-token-sum": _seq_mean_token_sum_weights,
    "seq-mean-token-mean": _seq_mean_token_mean_weights,
    "prompt-mean": _prompt_mean_weights,
}
AGGREGATION_MODES: tuple[str, ...] = tuple(_AGGREGATION_WEIGHTS)


def token_weights(response_mask: Tensor, mode: str, group_ids: Tensor | None = None) -> Tensor:
    """Per-token weights that turn a per-token loss into the mini-batch loss: sum(loss * w).

    Computed once per mini-batch and sliced by rows, the weights make the mini-batch loss the
    exact sum over micro-batches of `(per_token_loss[rows] * w[rows]).sum()`, so gradient
    accumulation reproduces the full-batch gradient whatever the micro-batch split. With L_j the
    number of response tokens of sequence j, N' the number of sequences with L_j > 0, D_i the
    such sequences of prompt i and B' the number of prompts with |D_i| > 0:

        token-mean           w_{j,t} = 1 / sum_j L_j         every token counts equally
        seq-mean-token-sum   w_{j,t} = 1 / N'                sums to mean_j L_j, not 1: long
                                                             sequences weigh more (Dr. GRPO)
        seq-mean-token-mean  w_{j,t} = 1 / (L_j N')          every sequence counts equally
        prompt-mean          w_{j,t} = 1 / (L_j |D_i| B')    every prompt counts equally: the
                                                             1/|D_i| weighting of the M-step
                                                             gradient estimate of GVM-EM
                                                             (arXiv 2505.02391, Algorithm 1)

    All but seq-mean-token-sum sum to 1 (0 for an empty mask). Sequences with no response
    token get weight 0 and do not count in N', |D_i| or B'.

    response_mask: (N, T) bool/float. group_ids: (N,) integer, needed by prompt-mean.
    Returns (N, T) float, 0 off the mask. Unknown `mode` raises ValueError.
    """
    weights_fn = _lookup(_AGGREGATION_WEIGHTS, mode, "aggregation mode")
    mask = response_mask.float()
    group_index = None
    if group_ids is not None:  # on the mask's device: CUDA's index_add_ refuses a CPU index
        group_index = torch.unique(group_ids.to(mask.device), return_inverse=True)[1]  # (N,)
    return weights_fn(mask, group_index)


def aggregate(per_token: Tensor, weights: Tensor) -> Tensor:
    """Reduce a per-token loss (N, T) to a scalar, `sum_{j,t} per_token_{j,t} * w_{j,t}`, with
    weights `w` from `token_weights` (computed over the whole mini-batch and sliced to the rows
    of a micro-batch: the micro-batch sums then add up to the mini-batch loss). Entries of weight
    0 are ignored even if they are not finite. Returns a 0-dim tensor, float32 at least when the
    weights are: they stay float32 so a bfloat16 loss is not summed with 8-bit-mantissa weights."""
    weights = weights.to(per_token.device)
    return torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token)).sum()


def _lookup(registry: dict[str, Callable], name: str, what: str) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(registry)}") from None
