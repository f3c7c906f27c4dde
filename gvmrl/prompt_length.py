"""Prompts that do not fit the model's context, found when prompts are loaded, before sampling.

A prompt of n tokens makes the rollout engine allocate a KV cache of n + max_new_tokens positions
and an n x n attention matrix: a 1 MB problem asks for about a terabyte and takes the whole batch
(or evaluation) down with it, and a prompt that fits but leaves less than max_new_tokens of the
context is sampled past the positions the model was trained on. So every prompt must satisfy
tokens + max_new_tokens <= context; the others are skipped and counted, or fail, by choice
(`data.overlong` in a run's config, `--overlong` for `gvmrl eval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gvmrl.data import format_prompt
from gvmrl.io import InputError
from gvmrl.records import PromptRecord

OVERLONG_CHOICES = ("skip", "error")

# Config attributes that hold a model's context length, by model family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model: Any) -> int | None:
    """The most positions `model` was built for (its config's), or None when it does not say."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class FittedPrompts:
    """The prompts that fit, and the ids of those skipped for length."""

    records: list[PromptRecord]
    skipped: list[str]
    max_prompt_tokens: int | None
    """The longest prompt allowed (context - max_new_tokens); None: the model states no context."""


def fit_to_context(
    records: Sequence[PromptRecord],
    tokenizer: Any,
    instruction: str | None,
    *,
    context: int | None,
    max_new_tokens: int,
    overlong: str,
    source: str,
) -> FittedPrompts:
    """Keep the records whose formatted prompt plus `max_new_tokens` fits in `context` tokens.

    overlong="skip" leaves the others out (their ids in `skipped`); "error" raises InputError
    naming `source` and the first such prompt. Either way, a source none of whose prompts fit
    raises InputError. Tokens are counted as the rollout engines count them (the chat-formatted
    prompt, no special tokens added); a prompt of at most max_prompt_tokens - 1 UTF-8 bytes is
    not tokenized, since byte-level, character-level and SentencePiece tokenizers give at most
    one token per byte plus a leading one.
    """
    if overlong not in OVERLONG_CHOICES:
        raise ValueError(f"overlong must be one of {OVERLONG_CHOICES}, got {overlong!r}")
    if context is None:
        return FittedPrompts(list(records), [], None)
    limit = context - max_new_tokens
    if limit < 1:
        raise InputError(
            source,
            None,
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens",
        )
    kept, skipped = [], []
    for record in records:
        text = format_prompt(tokenizer, record.problem, instruction)
        if len(text.encode("utf-8")) + 1 <= limit:
            kept.append(record)
            continue
        tokens = len(tokenizer.encode(text, add_special_tokens=False))
        if tokens <= limit:
            kept.append(record)
        elif overlong == "error":
            raise InputError(
                source,
                None,
                f"prompt {record.id!r} is {tokens} tokens; with max_new_tokens={max_new_tokens} "
                f"the model's context of {context} leaves {limit} (overlong=skip leaves such "
                "prompts out)",
            )
        else:
            skipped.append(record.id)
    if not kept:
        raise InputError(
            source,
            None,
            f"none of its {len(records)} prompts fits: each is longer than the {limit} tokens "
            f"that max_new_tokens={max_new_tokens} leaves of the model's context of {context}",
        )
    return FittedPrompts(kept, skipped, limit)
