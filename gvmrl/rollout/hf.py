"""Sampling from the training model itself with a lean batched decode loop (KV cache, left padding).

Why not `model.generate`: it prefills every sample of a prompt separately, grows the KV cache by
concatenation at every step (a quarter of CPU decode time on the built-in model), keeps
computing finished rows, and yields sampling log-probs only through the full warped scores.
This loop prefills each distinct prompt once and copies its cache to its samples, writes the
cache into a preallocated buffer, drops finished rows from it, applies temperature and top-p
once per step and keeps only the sampled token's log-prob.
Measured with `bench/rollout.py --threads 1` (512 sequences, 64 prompts x 8, built-in
architecture with random weights, mean response 39 tokens, on a shared 2-core CPU, so noisy):
this loop 4.3k response tokens per CPU-second, `model.generate` 2.0k.

Randomness: each sample has its own seed (`base.request_seeds`: from its (prompt, k), or given
by the caller), which fills its own table of uniforms on the CPU, one per decode step; step t
draws the token where u_t falls in the float64 cumulative distribution of that row (inverse
CDF). So a sample's tokens do not depend on which other samples share its batch, how the
request is split into batches, or which rank draws it: only on its prompt, seed and weights
(up to float rounding of the logits under another batch shape, which moves a draw only when
u_t lies within that rounding of a CDF boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gvmrl.guards import NonFiniteError
from gvmrl.rollout.base import (
    Sample,
    SamplingParams,
    check_request,
    cut_at_stop,
    eos_token_ids,
    request_seeds,
)

# Drop finished rows from the KV cache once they are this share of the rows still in it: each
# drop copies the cache, so dropping on every single finish would cost more than it saves.
_COMPACT_FRACTION = 0.125


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution tokens are drawn from: temperature, then nucleus (top-p).

    log q = log_softmax(mask_top_p(logits / T)), where mask_top_p sets to -inf every token
    outside the smallest highest-probability set whose mass reaches top_p (the most likely
    token is always kept). Ties at the boundary are broken by sort order.

    Args:
        logits: (N, V) next-token logits, any float dtype (computed in float32).
        temperature: > 0 (greedy decoding is handled by the caller).
        top_p: in (0, 1]; 1 keeps every token.
    Returns:
        (N, V) float32 log-probs; -inf outside the nucleus.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)  # (N, V)
    sorted_p = sorted_logp.exp()
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of strictly likelier tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(N,) index of the token row r draws with uniform u_r in [0, 1): the first token whose
    cumulative probability exceeds u_r x (row total), summed in float64 (a float32 sum over a
    150k vocabulary drifts by ~1e-4). Zero-probability tokens are never drawn.

    Args:
        probs: (N, V) non-negative, each row with a positive sum.
        uniforms: (N,) float64 in [0, 1).
    """
    cdf = probs.double().cumsum(dim=-1)  # (N, V), non-decreasing
    total = cdf[:, -1:]  # (N, 1)
    # below the total, so the first cdf entry above it has positive probability (u x total can
    # round up to the total when u is within 2^-53 of 1)
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def uniform_table(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(len(seeds), steps) float64 uniforms in [0, 1); row r from a CPU generator seeded
    seeds[r], so it is the same on every device and in every batch."""
    rows = [
        torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for seed in seeds
    ]
    return torch.stack(rows).to(device)


def draw_tokens(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row with its uniform (N,); return (tokens (N,), their log-probs (N,)
    under the sampler). Temperature 0 is greedy: the argmax with log-prob 0 (a point mass).

    Raises NonFiniteError when a row's logits hold NaN or inf: no distribution to draw from.
    """
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(
            "rollout: the policy's next-token logits hold NaN or inf, so no token can be drawn; "
            "its weights are not finite (a diverged update: lower optim.lr) or the checkpoint "
            "is damaged"
        )
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    logp = sampling_logprobs(logits, params.temperature, params.top_p)  # (N, V)
    tokens = inverse_cdf(logp.exp(), uniforms)  # (N,)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def plan_batches(
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    max_batch_sequences: int,
    max_batch_tokens: int | None,
) -> list[list[int]]:
    """Split sequences into batches that fit memory; each batch is a list of sequence indices.

    Sequences are taken longest prompt first (stable), so a batch holds similar lengths and
    wastes little on padding. A batch of n sequences whose longest prompt has L tokens holds at
    most n * (L + max_new_tokens) tokens of KV cache; it is capped by `max_batch_tokens` (when
    given) and n by `max_batch_sequences`. A single sequence always forms a batch.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = prompt_lengths[batch[0]] + max_new_tokens  # the first is the longest
            fits_tokens = max_batch_tokens is None or width * (len(batch) + 1) <= max_batch_tokens
            if len(batch) < max_batch_sequences and fits_tokens:
                batch.append(i)
                continue
        batches.append([i])
    return batches


class HFEngine:
    """Rollout engine over a Hugging Face causal LM, sharing the training model object.

    Args:
        model: the policy (any `AutoModelForCausalLM` that accepts `past_key_values`).
        tokenizer: its tokenizer; prompts are encoded without adding special tokens, because
            chat templates already contain them.
        max_batch_sequences: most sequences decoded together (no gain beyond 512 on a CPU).
        max_batch_tokens: optional cap on sequences x (prompt + max_new_tokens) per batch, to
            bound KV-cache memory on long prompts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_sequences: int = 512,
        max_batch_tokens: int | None = None,
    ):
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.max_batch_tokens = max_batch_tokens
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: this engine samples from the training model object itself."""
        self.model = model

    def generate(
        self,
        prompts: Sequence[str],
        num_samples: Sequence[int],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Samples ordered by prompt then sample; num_samples[i] == 0 gives none for prompt i.
        `seeds`: one per sample (`base.RolloutEngine.generate`)."""
        check_request(prompts, num_samples)
        seeds = request_seeds(num_samples, params, seeds)
        prompt_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        if any(not ids for ids in prompt_ids):
            raise ValueError("a prompt encodes to zero tokens")
        owners = [i for i, n in enumerate(num_samples) for _ in range(n)]  # prompt of each seq
        device = next(self.model.parameters()).device
        results: list[tuple[list[int], list[float], str] | None] = [None] * len(owners)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in plan_batches(
                    [len(prompt_ids[i]) for i in owners],
                    params.max_new_tokens,
                    self.max_batch_sequences,
                    self.max_batch_tokens,
                ):
                    rows = [prompt_ids[owners[s]] for s in batch]
                    steps = params.max_new_tokens
                    uniforms = uniform_table([seeds[s] for s in batch], steps, device)
                    for s, result in zip(batch, self._decode(rows, params, uniforms, device)):
                        results[s] = result
        finally:
            self.model.train(was_training)
        samples = []
        for owner, (response_ids, logprobs, finish_reason) in zip(owners, results):
            text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
            if finish_reason == "stop" and (end := cut_at_stop(text, params.stop)) is not None:
                text = text[:end]
            samples.append(
                Sample(owner, prompt_ids[owner], response_ids, text, logprobs, finish_reason)
            )
        return samples

    def _decode(
        self,
        rows: list[list[int]],
        params: SamplingParams,
        uniforms: torch.Tensor,
        device: torch.device,
    ) -> list[tuple[list[int], list[float], str]]:
        """Decode one batch, row r drawing step t with uniforms[r, t] ((R, M)); per row return
        (response ids, their log-probs, finish reason)."""
        R, M = len(rows), params.max_new_tokens  # rows, most new tokens
        # Samples of one prompt are adjacent (plan_batches keeps their order): prefill each
        # distinct prompt once and copy its KV cache to its samples.
        distinct: list[list[int]] = []
        copy_of: list[int] = []  # row -> index into distinct
        for ids in rows:
            if not distinct or ids != distinct[-1]:
                distinct.append(ids)
            copy_of.append(len(distinct) - 1)
        width = max(len(r) for r in distinct)
        input_ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for u, ids in enumerate(distinct):  # left padding: every prompt ends at column width - 1
            input_ids[u, width - len(ids) :] = torch.tensor(ids)
            attention_mask[u, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (U, width)
        cache = _preallocated_cache(self.model.config, capacity=width + M)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (U, V)
        copy_index = torch.tensor(copy_of, device=device)  # (R,)
        cache.batch_select_indices(copy_index)
        logits = logits[copy_index]  # (R, V)
        attention_mask = attention_mask[copy_index]  # (R, width)
        next_position = positions[copy_index, -1] + 1  # (R,)

        response = torch.zeros((R, M), dtype=torch.long, device=device)
        response_logp = torch.zeros((R, M), dtype=torch.float32, device=device)
        length = torch.zeros(R, dtype=torch.long, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)  # ended by EOS or a stop string
        in_cache = torch.arange(R, device=device)  # batch row of each cache row
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        for step in range(M):
            tokens, token_logp = draw_tokens(logits, params, uniforms[in_cache, step])  # (C,)
            live = ~done[in_cache]  # (C,)
            # Cache rows of finished sequences (kept until the next compaction) decode padding
            # that is written past their length and never read.
            response[in_cache, step] = tokens
            response_logp[in_cache, step] = token_logp
            length[in_cache[live]] += 1
            ended = live & torch.isin(tokens, eos)
            if params.stop:
                ended |= live & self._hits_stop(response, in_cache, step, params.stop)
            done[in_cache[ended]] = True
            if step == M - 1 or bool(done.all()):
                break
            live = ~done[in_cache]
            if (~live).sum() >= max(1, _COMPACT_FRACTION * len(in_cache)):
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                in_cache, tokens = in_cache[keep], tokens[keep]
                attention_mask, next_position = attention_mask[keep], next_position[keep]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(in_cache), 1))], dim=-1
            )  # (C, width + step + 1)
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]  # (C, V)
            next_position = next_position + 1
        lengths, finished_by_stop = length.tolist(), done.tolist()
        return [
            (ids[:n], lps[:n], "stop" if by_stop else "length")
            for ids, lps, n, by_stop in zip(
                response.tolist(), response_logp.tolist(), lengths, finished_by_stop
            )
        ]

    def _hits_stop(
        self, response: torch.Tensor, in_cache: torch.Tensor, step: int, stop: tuple[str, ...]
    ) -> torch.Tensor:
        """(C,) bool: the token just drawn completes a stop string in that row.

        Only the last max(len(stop string)) tokens are decoded: every token decodes to at least
        one character, and an earlier completion would already have ended the row.
        """
        window = max(len(s) for s in stop)
        tails = response[in_cache, max(0, step + 1 - window) : step + 1].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stop) for t in texts], device=response.device)


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes into a buffer sized for the whole decode instead of growing.

    `DynamicLayer.update` concatenates the new key/value onto the cache at every step, copying
    the whole cache each time (a quarter of CPU decode time on the built-in model); this one
    writes one column into a (B, heads, capacity, head_dim) buffer and returns a view of the
    filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Keys are stored in the values' dtype. Under autocast with fp32 weights RoPE hands back
        # fp32 keys (its cos/sin follow the fp32 residual stream), which attention casts to the
        # compute dtype anyway: storing them cast gives the same numbers in a third less cache.
        self.dtype, self.device = value_states.dtype, value_states.device
        B, H, _, D = key_states.shape  # batch, kv heads, new positions, head dim
        self._key_buffer = value_states.new_zeros((B, H, self.capacity, D))
        self._value_buffer = value_states.new_zeros((B, H, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of capacity {self.capacity} cannot hold {end} positions")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer[indices]
            self._value_buffer = self._value_buffer[indices]
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]


def _preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """The model's DynamicCache with every plain full-attention layer preallocated to `capacity`.

    Other layer kinds (sliding window, linear attention) keep their own implementation.
    """
    cache = DynamicCache(config=config)
    cache.layers = [
        _PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache
