"""Padded sequence batches and memory-bounded per-token log-probabilities.

A batch holds `N` sequences of `T` positions: `input_ids[N,T]`, `attention_mask[N,T]` (1 = real
token) and `response_mask[N,T]` (1 = a response token whose log-prob is trained). Log-probs are
aligned to input positions: `logp[n, t] = log pi(x[n,t] | x[n,<t])`, 0 where no prediction exists
(position 0, padding, the first real token of a left-padded row).

Language-model heads of reasoning models have ~150k outputs; `N*T*V` logits for a training batch
would take tens of GB, so `token_logprobs` applies the output layer to the last hidden states in
token chunks, recomputing each chunk in the backward pass instead of keeping its logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PADDING_SIDES = ("left", "right")
LOGITS_CHUNK_ELEMENTS = 2**25  # default logits per chunk: 128 MiB in float32


@dataclass
class SequenceBatch:
    """`N` padded token sequences with their attention and response masks (all `(N, T)`)."""

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long, 1 = real token
    response_mask: torch.Tensor  # (N, T) float, 1 = response token whose log-prob counts

    def to(self, device: str | torch.device) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> SequenceBatch:
        """Rows `index` (a slice, indices or a bool mask), e.g. one micro-batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return SequenceBatch(
            self.input_ids[index], self.attention_mask[index], self.response_mask[index]
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def trimmed(self) -> SequenceBatch:
        """Without the all-padding columns at the right (of a right-padded batch)."""
        width = int(self.attention_mask.sum(dim=1).max())
        return SequenceBatch(
            self.input_ids[:, :width], self.attention_mask[:, :width], self.response_mask[:, :width]
        )


def micro_batches(batch: SequenceBatch, size: int) -> Iterator[tuple[slice, SequenceBatch]]:
    """Consecutive rows of a right-padded batch, `size` at a time, each trimmed to its own longest
    sequence: (rows, micro-batch). Slice per-token tensors of the whole batch with
    `[rows, : micro.input_ids.shape[1]]` to line them up with the micro-batch."""
    for start in range(0, len(batch), size):
        rows = slice(start, start + size)
        yield rows, batch.select(rows).trimmed()


def token_budget_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split rows into micro-batches whose padded size, rows x their own longest row, is at most
    `max_tokens`: what activation memory grows with, so long and short responses cost alike.

    Rows are taken longest first (stable), so each micro-batch holds similar lengths and pads
    little; a row joins the current micro-batch while (rows + 1) x its first (longest) row's
    length fits. A row longer than `max_tokens` forms a micro-batch of its own. Pure: lengths in,
    lists of row indices out; every row lands in exactly one list.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def micro_batches_by_tokens(
    batch: SequenceBatch, max_tokens: int
) -> Iterator[tuple[torch.Tensor, SequenceBatch]]:
    """Micro-batches of a right-padded batch by `token_budget_rows`, each trimmed to its own
    longest sequence: (row indices, micro-batch). Index per-token tensors of the whole batch with
    `[rows, : micro.input_ids.shape[1]]`, as for `micro_batches`."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    for group in token_budget_rows(lengths, max_tokens):
        rows = torch.tensor(group, dtype=torch.long, device=batch.input_ids.device)
        yield rows, batch.select(rows).trimmed()


def plan_micro_batches(
    batch: SequenceBatch, *, size: int, max_tokens: int | None
) -> Iterator[tuple[slice | torch.Tensor, SequenceBatch]]:
    """The micro-batches of one forward/backward sweep (`update.max_tokens_per_micro_batch`):
    by token budget when `max_tokens` is set, else `size` consecutive rows."""
    if max_tokens is None:
        return micro_batches(batch, size)
    return micro_batches_by_tokens(batch, max_tokens)


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
) -> SequenceBatch:
    """Concatenate prompt and response ids row by row and pad them to one length.

    `response_mask` is 1 exactly on the response positions, so a loss over it trains the response
    tokens only. Padding goes on `padding_side` ("left" for generation, either for training).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    rows = [(list(p), list(r)) for p, r in zip(prompt_ids, response_ids)]
    if not rows:
        raise ValueError("no sequences to pack")
    if any(not p and not r for p, r in rows):
        raise ValueError("a sequence with an empty prompt and an empty response has no tokens")
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.float32)
    for n, (prompt, response) in enumerate(rows):
        start = length - len(prompt) - len(response) if padding_side == "left" else 0
        end = start + len(prompt) + len(response)
        input_ids[n, start:end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[n, start:end] = 1
        response_mask[n, start + len(prompt) : end] = 1.0
    return SequenceBatch(input_ids, attention_mask, response_mask)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions
    (and gives the same log-probs) as the unpadded sequence. Padding gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden_states(
    model: PreTrainedModel,
    attention_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T, D) final-layer hidden states (after the final norm), i.e. the output layer's input.

    Runs the decoder body (`model.base_model`) without the output layer, so no logits are formed.
    """
    output = model.base_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return output.last_hidden_state


def prediction_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T-1) bool: position t+1 holds a real token predicted from a real token at position t."""
    real = attention_mask.bool()
    return real[:, 1:] & real[:, :-1]


def _chunk_logprobs(
    output_layer: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """(M, 1 or 2): log-prob of each of M target tokens and, optionally, the entropy."""
    logits = output_layer(hidden)  # (M, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    columns = [logp_all.gather(-1, targets[:, None])]
    if with_entropy:
        columns.append(-(logp_all.exp() * logp_all).sum(-1, keepdim=True))
    return torch.cat(columns, dim=-1)


def token_logprobs(
    model: PreTrainedModel,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(x_t | x_<t) / T-scaled, differentiable, without all logits at once.

    logp[n, t] = log softmax(lm_head(h[n, t-1]) / temperature)[x[n, t]] for each real token t with
    a real predecessor; 0 elsewhere. The output layer runs on chunks of `chunk_size` predicted
    tokens (default: as many as fit `LOGITS_CHUNK_ELEMENTS` logits); with autograd on and more
    than one chunk, each chunk is checkpointed, so its (chunk, V) logits are recomputed in the
    backward pass rather than kept: peak memory is one chunk of logits, not N*T*V.

    Args:
        model: a causal LM whose logits are `model.get_output_embeddings()(last hidden state)`.
        batch: (N, T) ids and masks, padded on either side.
        temperature: the sampling temperature the log-probs should describe.
        chunk_size: predicted tokens per output-layer call.
        with_entropy: also return the entropy of each predictive distribution.
    Returns:
        logp (N, T) in float32 (float64 for a float64 model); with `with_entropy`, also the (N, T)
        entropy H(pi(. | x_<t)) at the same positions (0 where logp is 0).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden = last_hidden_states(model, batch.attention_mask, input_ids=batch.input_ids)  # (N, T, D)
    predicted = prediction_mask(batch.attention_mask)  # (N, T-1)
    rows = hidden[:, :-1][predicted]  # (M, D)
    targets = batch.input_ids[:, 1:][predicted]  # (M,)
    output_layer = model.get_output_embeddings()
    vocab_size = output_layer.weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
    checkpointed = torch.is_grad_enabled() and rows.shape[0] > chunk_size
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (output_layer, rows[start : start + chunk_size], targets[start : start + chunk_size])
        if checkpointed:
            piece = torch.utils.checkpoint.checkpoint(
                _chunk_logprobs, *args, temperature, with_entropy, use_reentrant=False
            )
        else:
            piece = _chunk_logprobs(*args, temperature, with_entropy)
        pieces.append(piece)
    if pieces:
        values = torch.cat(pieces)  # (M, 1 or 2)
    else:
        values = hidden.new_zeros(
            (0, 1 + with_entropy), dtype=torch.promote_types(hidden.dtype, torch.float32)
        )
    # One (N, T) tensor per output rather than views of one: FSDP hooks the outputs of a forward
    # method it wraps, and an in-place op on a view would skip that hook.
    n, t = batch.input_ids.shape
    grids = []
    for column in range(values.shape[-1]):
        grid = values.new_zeros((n, t))
        grid[:, 1:][predicted] = values[:, column]  # index_put keeps the graph; padding stays 0
        grids.append(grid)
    return (grids[0], grids[1]) if with_entropy else grids[0]


def sweep_logprobs(
    model: PreTrainedModel,
    batch: SequenceBatch,
    *,
    size: int,
    max_tokens: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, T) `token_logprobs` of a right-padded batch without autograd, micro-batched as the
    update is (`plan_micro_batches`): pi_old recomputed with the training model
    (`loss.old_logprobs: recompute`) and the reference model's log-probs for the KL term.
    Each micro-batch is trimmed to its own longest row; positions past it stay 0."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    with torch.no_grad():
        for rows, micro in plan_micro_batches(batch, size=size, max_tokens=max_tokens):
            logp = token_logprobs(model, micro, temperature=temperature)
            out[rows, : micro.input_ids.shape[1]] = logp.float()
    return out
