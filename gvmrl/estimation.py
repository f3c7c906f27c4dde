"""Stage 2 of GVM: exact per-sample gradient norms in batched passes, and per-prompt statistics.

GVM (arXiv 2505.02391) allocates samples by each prompt's accept rate p_i and gradient norm G_i,
the mean over the prompt's accepted samples of ||grad_theta L_b||, with the per-sample loss

    L_b = -sum_t response_mask[b, t] * log pi(x[b, t] | x[b, <t])     (a sum, not a mean, over t)

and theta a parameter group (the paper's default: the token embeddings). The reference code
(RLHFlow/GVM, em/stage_2_calc_acceptRates_grads.py, `calc_grad_logp`) runs, per accepted sample,
one bf16 forward of the chat prompt + response and one `autograd.grad` of exactly this loss
(temperature 1, summed over the response tokens; its division by the length is commented out)
w.r.t. the parameters whose name contains `act_params` (default "embed_tokens"; all others
frozen), keeps the norm of the first such parameter, and averages over the prompt's accepted
samples (0 if none). Here the norms of all samples come from one batched pass, exactly:

* Input embeddings E (V, D): sample b's gradient is sum_t e_{x_t} g_t^T with g_t = dL_b/d emb_t,
  the gradient at the embedding output. Samples do not interact, so one backward of sum_b L_b
  w.r.t. the embedding outputs gives every g_t; rows with the same token id are summed
  (index_add over (sample, token) keys) and squared: ||G_in||^2 = sum_u ||sum_{t: x_t=u} g_t||^2.
* Output layer W (V, D): with h_t the last hidden state predicting y_t and
  d_t = m_t (softmax(W h_t) - e_{y_t}) the logit gradient, G_out = sum_t d_t h_t^T and
  ||G_out||^2 = sum_{s,t} <d_s, d_t> <h_s, h_t>   (ghost norm; (R, R) Gram matrices per sample),
  where <d_s, d_t> = m_s m_t (<p_s, p_t> - p_s[y_t] - p_t[y_s] + [y_s = y_t]). <p_s, p_t> is
  accumulated over vocabulary chunks with an online-softmax rescaling, so the logits are formed
  once, a chunk at a time, and never for all tokens and the whole vocabulary at once. No backward
  through the layers is needed.
* Tied embeddings (E is W): the gradient of the shared matrix is G_in + G_out, so
  ||G||^2 = ||G_in||^2 + ||G_out||^2 + 2 <G_in, G_out> with
  <G_in, G_out> = sum_{s,t} d_t[x_s] <g_s, h_t>.

Weight gradients are never formed: all parameters are frozen while estimating and autograd
differentiates w.r.t. the embedding outputs only. Cost per sample of T tokens, R of them
response: the forward, plus O(R V D + R^2 V) for the output layer, plus (input side) one
backward through the layers w.r.t. activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gvmrl.batching import (
    LOGITS_CHUNK_ELEMENTS,
    last_hidden_states,
    pack_sequences,
    prediction_mask,
    token_budget_rows,
)
from gvmrl.records import ACCEPT_THRESHOLD, is_accepted

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ParamSelector = str | Sequence[str] | Callable[[str], bool]


@dataclass(frozen=True)
class ParameterGroup:
    """Which of the two supported matrices a `params` selector picked.

    `input_side`: the input embedding matrix is in the group; `output_side`: the output layer's
    weight is. `tied`: they are one matrix, so both contributions add before the norm.
    """

    input_side: bool
    output_side: bool
    tied: bool


def _name_predicate(params: ParamSelector) -> Callable[[str], bool]:
    if isinstance(params, str):
        return lambda name: params in name
    if callable(params):
        return params
    substrings = list(params)
    if not substrings or not all(isinstance(s, str) for s in substrings):
        raise ValueError(
            "params must be a substring, a non-empty list of substrings or a predicate, "
            f"got {params!r}"
        )
    return lambda name: any(s in name for s in substrings)


def resolve_parameter_group(model: PreTrainedModel, params: ParamSelector) -> ParameterGroup:
    """Map a name selector (substring, substrings or predicate over parameter names) to a group.

    Names are matched over `named_parameters(remove_duplicate=False)`, so with tied embeddings
    both `model.embed_tokens.weight` and `lm_head.weight` name the one shared matrix. Only the
    input embedding and output layer weights have an exact batched estimator here; a selector that
    matches anything else (or nothing) raises ValueError.
    """
    matches = _name_predicate(params)
    embedding = model.get_input_embeddings()
    output_layer = model.get_output_embeddings()
    supported = {id(embedding.weight), id(output_layer.weight)}
    matched = [
        (name, p) for name, p in model.named_parameters(remove_duplicate=False) if matches(name)
    ]
    unsupported = sorted({name for name, p in matched if id(p) not in supported})
    if unsupported:
        raise ValueError(
            f"params {params!r} matches {unsupported[:5]}: exact batched gradient norms exist "
            "only for the input embedding and output layer weights "
            "(use 'embed_tokens' or 'lm_head')"
        )
    if not matched:
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        raise ValueError(f"params {params!r} matches no parameter (some names: {names[:4]})")
    matched_ids = {id(p) for _, p in matched}
    input_side = id(embedding.weight) in matched_ids
    output_side = id(output_layer.weight) in matched_ids
    if input_side and type(embedding) is not torch.nn.Embedding:
        raise ValueError(
            f"input embedding is a {type(embedding).__name__}, not a plain nn.Embedding"
        )
    if output_side and not isinstance(output_layer, torch.nn.Linear):
        raise ValueError(f"output layer is a {type(output_layer).__name__}, not an nn.Linear")
    return ParameterGroup(input_side, output_side, tied=embedding.weight is output_layer.weight)


@contextlib.contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: the norm is a function of the sample) and no parameter gradients
    (so the forward keeps no activations for weight gradients); both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def per_sample_grad_norms(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    params: ParamSelector = "embed_tokens",
    micro_batch_size: int | None = None,
    *,
    max_tokens_per_micro_batch: int | None = None,
    max_chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """||grad_theta L_b||_2 for every sequence b, exactly, without a backward pass per sample.

    L_b = -sum_t response_mask[b, t] * log pi(x[b, t] | x[b, <t]) at temperature 1; theta the
    parameters whose name matches `params` (see `resolve_parameter_group`). Method: module doc.

    Args:
        model: causal LM with logits = get_output_embeddings()(last hidden state), e.g. Qwen2/Llama.
        input_ids: (B, T) long, padded on either side.
        attention_mask: (B, T), 1 = real token.
        response_mask: (B, T), weight of each token's log-prob in L_b (1 on response tokens, gaps
            allowed); positions without a prediction (first real token, padding) are ignored.
        params: "embed_tokens" (paper default), "lm_head", a list of substrings or a predicate.
        micro_batch_size: sequences per pass; bounds activation memory. Default: the most rows
            whose (rows, T, T) Gram matrices fit `max_chunk_elements` (all of a batch of 300-token
            sequences; 3 rows of 3072 tokens).
        max_tokens_per_micro_batch: when set, micro-batches by token budget instead
            (`gvmrl.batching.token_budget_rows`: rows x own longest row <= budget, longest rows
            first), still capped by `micro_batch_size` and the Gram-matrix budget. Either way each
            micro-batch drops its all-padding columns, so activation memory follows its own
            longest row, not the whole batch's.
        max_chunk_elements: elements of the largest temporary (logits chunk, Gram matrices).
    Returns:
        (B,) norms, float32 (float64 for a float64 model), on the input device.
    """
    group = resolve_parameter_group(model, params)
    dtype = torch.promote_types(model.dtype, torch.float32)
    squares = torch.zeros(input_ids.shape[0], dtype=dtype, device=input_ids.device)
    with _frozen_eval(model):
        for rows in _grad_norm_micro_batches(
            attention_mask, micro_batch_size, max_tokens_per_micro_batch, max_chunk_elements
        ):
            columns = _real_columns(attention_mask[rows])
            squares[rows] = _squared_norms(
                model,
                group,
                input_ids[rows][:, columns],
                attention_mask[rows][:, columns],
                response_mask[rows][:, columns],
                max_chunk_elements,
            ).to(dtype)
    return squares.clamp(min=0).sqrt()


def _real_columns(attention_mask: torch.Tensor) -> slice:
    """The columns from the first to the last that holds a real token in any row (padding on
    either side dropped; positions count real tokens only, so nothing else changes)."""
    real = torch.nonzero(attention_mask.bool().any(dim=0)).flatten()
    if real.numel() == 0:
        return slice(0, 0)
    return slice(int(real[0]), int(real[-1]) + 1)


def _grad_norm_micro_batches(
    attention_mask: torch.Tensor,
    micro_batch_size: int | None,
    max_tokens: int | None,
    max_chunk_elements: int,
) -> list[torch.Tensor]:
    """Row indices of each micro-batch of the norm stage.

    Count-based (default): consecutive rows, `micro_batch_size` or as many as keep the
    (rows, T, T) Gram matrices within `max_chunk_elements`. Token budget: `token_budget_rows`
    over the real lengths, each group then split further by those two caps.
    """
    size, width = attention_mask.shape
    device = attention_mask.device
    if max_tokens is None:
        step = micro_batch_size or max(1, min(size, max_chunk_elements // max(width * width, 1)))
        return [torch.arange(s, min(s + step, size), device=device) for s in range(0, size, step)]
    lengths = attention_mask.sum(dim=1).tolist()
    out = []
    for group in token_budget_rows(lengths, max_tokens):
        longest = max(lengths[group[0]], 1)
        cap = max(1, max_chunk_elements // (longest * longest))
        if micro_batch_size is not None:
            cap = min(cap, micro_batch_size)
        for start in range(0, len(group), cap):
            out.append(torch.tensor(group[start : start + cap], dtype=torch.long, device=device))
    return out


def sequence_grad_norms(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    params: ParamSelector = "embed_tokens",
    batch_size: int = 16,
) -> torch.Tensor:
    """(N,) `per_sample_grad_norms` of prompt + response token lists, in the order given.

    Sequences are sorted by length before being cut into batches of `batch_size`, so each batch
    pads to a similar length (padding costs compute but does not change the norms).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    device = next(model.parameters()).device
    norms = torch.zeros(len(order), dtype=torch.promote_types(model.dtype, torch.float32))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = pack_sequences(
            [prompt_ids[i] for i in index], [response_ids[i] for i in index], pad_id
        ).to(device)
        norms[index] = per_sample_grad_norms(
            model, batch.input_ids, batch.attention_mask, batch.response_mask, params
        ).cpu()
    return norms


@dataclass
class _ResponseRows:
    """The R predicted response tokens of each sample, gathered and right-padded: (n, R, ...)."""

    hidden: torch.Tensor  # (n, R, D) last hidden state that predicts each token (0 on padding rows)
    targets: torch.Tensor  # (n, R) the predicted token ids y_t
    weights: torch.Tensor  # (n, R) response_mask at the token (0 on padding rows)
    positions: torch.Tensor  # (n, R) index of the hidden state in the (T-1) predicting positions


def _response_rows(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> _ResponseRows:
    weights = response_mask[:, 1:].to(hidden.dtype) * prediction_mask(attention_mask)  # (n, T-1)
    selected = weights != 0
    counts = selected.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    positions = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[
        :, :width
    ]  # selected first
    valid = torch.arange(width, device=hidden.device) < counts[:, None]  # (n, R)
    rows = hidden[:, :-1].gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return _ResponseRows(
        hidden=rows * valid[..., None],
        targets=input_ids[:, 1:].gather(1, positions),
        weights=weights.gather(1, positions) * valid,
        positions=positions,
    )


@dataclass
class _SoftmaxMoments:
    """What the output-layer pass returns for the response rows (all over the full vocabulary)."""

    logsumexp: torch.Tensor  # (n, R) log sum_v exp(z_t[v])
    prob_gram: torch.Tensor | None  # (n, R, R) <p_s, p_t>
    expected_rows: torch.Tensor | None  # (n, R, D) sum_v p_t[v] W[v]


def _softmax_moments(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gram: bool,
    expected_rows: bool,
    max_chunk_elements: int,
) -> _SoftmaxMoments:
    """One pass over vocabulary chunks of z = rows W^T + b, with online-softmax rescaling.

    Keeps a running max c_t and s_t = sum_v exp(z_t[v] - c_t); when c_t grows, the accumulated
    sums are multiplied by exp(c_old - c_new) (per row; per row pair for the Gram matrix), so the
    result equals the full-vocabulary computation while only (n, R, chunk) logits exist at a time.
    rows: (n, R, D); weight: (V, D); bias: (V,) or None.
    """
    n, r, _ = rows.shape
    vocab_size = weight.shape[0]
    chunk = max(1, max_chunk_elements // max(n * r, 1))
    running_max = rows.new_full((n, r), float("-inf"))
    total = rows.new_zeros((n, r))
    prob_gram = rows.new_zeros((n, r, r)) if gram else None
    expected = torch.zeros_like(rows) if expected_rows else None
    for start in range(0, vocab_size, chunk):
        weight_chunk = weight[start : start + chunk].to(rows.dtype)  # (Vc, D)
        logits = rows @ weight_chunk.T  # (n, R, Vc)
        if bias is not None:
            logits = logits + bias[start : start + chunk].to(rows.dtype)
        new_max = torch.maximum(running_max, logits.amax(-1))
        rescale = torch.exp(running_max - new_max)  # (n, R); 0 on the first chunk
        exps = torch.exp(logits - new_max[..., None])  # (n, R, Vc)
        total = total * rescale + exps.sum(-1)
        if prob_gram is not None:
            prob_gram = prob_gram * (
                rescale[:, :, None] * rescale[:, None, :]
            ) + exps @ exps.transpose(1, 2)
        if expected is not None:
            expected = expected * rescale[..., None] + exps @ weight_chunk
        running_max = new_max
    inverse_total = 1.0 / total  # exp(c_t - logsumexp_t)
    return _SoftmaxMoments(
        logsumexp=running_max + torch.log(total),
        prob_gram=None
        if prob_gram is None
        else prob_gram * inverse_total[:, :, None] * inverse_total[:, None, :],
        expected_rows=None if expected is None else expected * inverse_total[..., None],
    )


def _probabilities_of(
    rows: torch.Tensor,
    logsumexp: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """(n, R, S): p_t[tokens_s] = softmax(W h_t + b)[tokens_s] for rows (n, R, D), tokens (n, S)."""
    logits = rows @ weight[tokens].to(rows.dtype).transpose(1, 2)  # (n, R, S)
    if bias is not None:
        logits = logits + bias[tokens].to(rows.dtype)[:, None, :]
    return torch.exp(logits - logsumexp[..., None])


def _embedding_squared_norms(
    embedding_grads: torch.Tensor, input_ids: torch.Tensor, counted: torch.Tensor
) -> torch.Tensor:
    """(n,): sum over token ids u of ||sum_{t: x_t = u, counted} g_t||^2 per sample.

    embedding_grads: (n, T, D); input_ids, counted: (n, T). Equal to the Gram form
    sum_{s,t} [x_s = x_t] <g_s, g_t> in O(n T D) instead of O(n T^2 D).
    """
    n, _, dim = embedding_grads.shape
    stride = int(input_ids.max()) + 1 if input_ids.numel() else 1
    sample = torch.arange(n, device=input_ids.device)[:, None].expand_as(input_ids)
    keys = (sample * stride + input_ids)[counted]  # (M,) one key per (sample, token id)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    summed = embedding_grads.new_zeros((unique_keys.shape[0], dim)).index_add_(
        0, inverse, embedding_grads[counted]
    )  # (U, D)
    return embedding_grads.new_zeros(n).index_add_(0, unique_keys // stride, summed.pow(2).sum(-1))


def _squared_norms(
    model: PreTrainedModel,
    group: ParameterGroup,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    max_chunk_elements: int,
) -> torch.Tensor:
    """(n,) squared gradient norms of one micro-batch (see the module docstring for the math)."""
    embedding = model.get_input_embeddings()
    output_layer = model.get_output_embeddings()
    weight, bias = output_layer.weight, output_layer.bias
    dtype = torch.promote_types(model.dtype, torch.float32)
    with torch.set_grad_enabled(group.input_side):
        embeds = embedding(input_ids).detach().requires_grad_(group.input_side)  # (n, T, D)
        hidden = last_hidden_states(model, attention_mask, inputs_embeds=embeds)  # (n, T, D)
    # The output-layer identities run in full precision even under a bf16 autocast (fp32
    # master weights): the forward above follows the caller's precision, the norm's math not.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        rows = _response_rows(hidden.detach().to(dtype), input_ids, attention_mask, response_mask)
        moments = _softmax_moments(
            rows.hidden,
            weight,
            bias,
            gram=group.output_side,
            expected_rows=group.input_side,
            max_chunk_elements=max_chunk_elements,
        )
        m = rows.weights  # (n, R)
        squared = rows.hidden.new_zeros(input_ids.shape[0])
        if group.output_side:
            p_at_targets = _probabilities_of(
                rows.hidden, moments.logsumexp, weight, bias, rows.targets
            )  # [s,t]: p_s[y_t]
            same_target = (rows.targets[:, :, None] == rows.targets[:, None, :]).to(dtype)
            logit_grad_gram = (
                moments.prob_gram - p_at_targets - p_at_targets.transpose(1, 2) + same_target
            ) * (m[:, :, None] * m[:, None, :])  # (n, R, R) <d_s, d_t>
            hidden_gram = rows.hidden @ rows.hidden.transpose(1, 2)  # (n, R, R) <h_s, h_t>
            squared = squared + (logit_grad_gram * hidden_gram).sum((1, 2))
        if group.input_side:
            # dL/dh_t = W^T d_t = m_t (sum_v p_t[v] W[v] - W[y_t]), pushed back to the embeddings.
            hidden_grad_rows = m[..., None] * (
                moments.expected_rows - weight[rows.targets].to(dtype)
            )  # (n, R, D)
            hidden_grad = torch.zeros_like(hidden)
            hidden_grad[:, :-1].scatter_add_(
                1,
                rows.positions[..., None].expand_as(hidden_grad_rows),
                hidden_grad_rows.to(hidden.dtype),
            )
            (embedding_grads,) = torch.autograd.grad(hidden, embeds, grad_outputs=hidden_grad)
            embedding_grads = embedding_grads.to(dtype)  # (n, T, D)
            # nn.Embedding leaves its padding_idx row out of the weight gradient.
            counted = attention_mask.bool()
            if embedding.padding_idx is not None:
                counted = counted & (input_ids != embedding.padding_idx)
            squared = squared + _embedding_squared_norms(embedding_grads, input_ids, counted)
            if group.tied:
                squared = squared + 2 * _tied_cross_term(
                    rows, moments, weight, bias, embedding_grads, input_ids, counted
                )
        return squared


def _tied_cross_term(
    rows: _ResponseRows,
    moments: _SoftmaxMoments,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    embedding_grads: torch.Tensor,
    input_ids: torch.Tensor,
    counted: torch.Tensor,
) -> torch.Tensor:
    """(n,): <G_in, G_out> = sum_{s,t} d_t[x_s] <g_s, h_t>, d_t[x_s] = m_t (p_t[x_s] - [y_t = x_s]).

    s runs over the counted input positions (n, T), t over the response rows (n, R).
    """
    p_at_inputs = _probabilities_of(
        rows.hidden, moments.logsumexp, weight, bias, input_ids
    )  # (n, R, T)
    is_target = (rows.targets[:, :, None] == input_ids[:, None, :]).to(p_at_inputs.dtype)
    logit_grads = (
        rows.weights[..., None] * (p_at_inputs - is_target) * counted[:, None, :]
    )  # (n, R, T)
    grad_hidden_dots = rows.hidden @ embedding_grads.transpose(1, 2)  # (n, R, T) <h_t, g_s>
    return (logit_grads * grad_hidden_dots).sum((1, 2))


@dataclass
class PromptStats:
    """Per-prompt statistics of graded samples (arrays of length B, in first-appearance order).

    accept_rate p_i = num_accepted / num_samples; grad_norm G_i = mean per-sample gradient norm over
    the accepted samples (0 when none is accepted), the two inputs of `gvmrl.allocation.allocate`.
    """

    prompt_ids: list[Any]
    accept_rate: np.ndarray  # (B,) float64
    grad_norm: np.ndarray  # (B,) float64
    num_samples: np.ndarray  # (B,) int64
    num_accepted: np.ndarray  # (B,) int64

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per prompt: the STATS.jsonl rows `gvmrl allocate --stats` reads."""
        return [
            {
                "prompt_id": prompt_id,
                "accept_rate": float(self.accept_rate[i]),
                "grad_norm": float(self.grad_norm[i]),
                "num_samples": int(self.num_samples[i]),
                "num_accepted": int(self.num_accepted[i]),
            }
            for i, prompt_id in enumerate(self.prompt_ids)
        ]


def prompt_stats(
    group_ids: Sequence[Any],
    scores: Sequence[float],
    grad_norms: Sequence[float],
    *,
    accept_threshold: float = ACCEPT_THRESHOLD,
) -> PromptStats:
    """Group samples by prompt: accept rate and mean accepted gradient norm (GVM Alg. 1, stage 2).

    Args:
        group_ids: (N,) prompt id of each sample (hashable; numpy scalars become Python ones).
        scores: (N,) grade of each sample; accepted when score >= accept_threshold
            (`gvmrl.records.is_accepted`).
        grad_norms: (N,) per-sample gradient norm, NaN where not computed: for rejected samples,
            and for accepted ones left out of a subset (G_i averages the measured ones; each
            prompt with an accepted sample needs at least one finite norm >= 0).
    Returns:
        PromptStats with one entry per distinct id, in order of first appearance.
    """
    scores_array = np.asarray(scores, dtype=np.float64)
    norms = np.asarray(grad_norms, dtype=np.float64)
    if (
        not (len(group_ids) == scores_array.size == norms.size)
        or scores_array.ndim != 1
        or norms.ndim != 1
    ):
        raise ValueError(
            f"group_ids, scores and grad_norms must be 1-D of one length, got {len(group_ids)}, "
            f"{scores_array.shape}, {norms.shape}"
        )
    accepted = is_accepted(scores_array, accept_threshold)
    measured = accepted & ~np.isnan(norms)
    bad = np.flatnonzero(measured & ~(np.isfinite(norms) & (norms >= 0)))
    if bad.size:
        raise ValueError(
            f"grad_norms[{bad[0]}] = {norms[bad[0]]}: an accepted sample needs a finite norm >= 0"
        )
    index: dict[Any, int] = {}
    plain_ids = [g.item() if isinstance(g, np.generic) else g for g in group_ids]  # JSON-ready
    group = np.array([index.setdefault(g, len(index)) for g in plain_ids], dtype=np.int64)
    size = len(index)
    num_samples = np.bincount(group, minlength=size)
    num_accepted = np.bincount(group, weights=accepted, minlength=size).astype(np.int64)
    num_measured = np.bincount(group, weights=measured, minlength=size)
    unmeasured = np.flatnonzero((num_accepted > 0) & (num_measured == 0))
    if unmeasured.size:
        raise ValueError(
            f"prompt {list(index)[unmeasured[0]]!r} has accepted samples but no gradient norm: "
            "at least one of them needs a finite norm >= 0"
        )
    norm_sums = np.bincount(group, weights=np.where(measured, norms, 0.0), minlength=size)
    return PromptStats(
        prompt_ids=list(index),
        accept_rate=num_accepted / np.maximum(num_samples, 1),
        grad_norm=np.divide(norm_sums, num_measured, out=np.zeros(size), where=num_measured > 0),
        num_samples=num_samples.astype(np.int64),
        num_accepted=num_accepted,
    )
