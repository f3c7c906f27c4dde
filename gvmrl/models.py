"""Load a causal LM and its tokenizer by path, hub id or `builtin` (the shipped built-in model,
`gvmrl.builtin`), ready for training and rollouts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gvmrl.builtin.model import BUILTIN, builtin_checkpoint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _end_token_ids(
    tokenizer: PreTrainedTokenizerBase, configured: int | list[int] | None
) -> list[int]:
    """Ids that end a response: the configured ones, the tokenizer's EOS and a chat turn end.

    Chat templates of Qwen-style models close turns with `<|im_end|>` while the base tokenizer's
    EOS is `<|endoftext|>`; generation must stop at either.
    """
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    candidates = [tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, str) and "<|im_end|>" in template:
        candidates.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    for token_id in candidates:
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def load_model_and_tokenizer(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and tokenizer; `builtin` means the shipped built-in checkpoint.

    Anything else goes to `AutoModelForCausalLM/AutoTokenizer.from_pretrained` (a local directory,
    or a hub id for users with network access). The tokenizer gets a pad token (EOS if it has
    none); padding side is left to the caller (rollouts pad left). The model's generation config
    stops at every end-of-response id (`_end_token_ids`) and pads with the pad id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(builtin_checkpoint()) if name_or_path == BUILTIN else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    generation = model.generation_config
    generation.eos_token_id = _end_token_ids(tokenizer, generation.eos_token_id)
    generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
