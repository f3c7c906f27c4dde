"""Load a causal LM and its tokenizer by path, hub id or `builtin`; define the built-in tiny model.

The built-in model is what runs everywhere without downloads: a character-level tokenizer built
with `tokenizers` and a ~1.06M-parameter Qwen2 (hidden 128, 4 layers, 4 heads, MLP 512, tied
embeddings; CALIBRATION.md found 2 layers learn only 1-2-step chains). Its weights come from
`gvmrl pretrain` and are cached under `$GVMRL_CACHE` (default `~/.cache/gvmrl`) as `builtin-v2`,
a normal Hugging Face checkpoint directory that `from_pretrained` loads.

Prompts for the built-in model use no instruction (`format_prompt(tok, problem, None)`): a
character-level model pays one token per character, and the 70-character instruction would
double the sequence length without telling it anything its training did not.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

BUILTIN = "builtin"
BUILTIN_VERSION = "builtin-v2"  # bump when the task, tokenizer, architecture or warm start changes

PAD, END, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, END, UNK, *ROLE_MARKERS)
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII

# Each turn is `<|role|>content<|end|>`; the generation prompt opens the assistant turn, so the
# model's answer ends with <|end|>, its EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_level(text: str) -> str:
    """GPT-2 byte-level spelling of ASCII text: space is `Ġ`, newline `Ċ`, other printables stay."""
    return "".join(chr(256 + ord(c)) if ord(c) <= 32 else c for c in text)


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: special tokens (ids 0-5), then newline and printable ASCII.

    A BPE model without merges gives one token per character. The characters are stored in
    their byte-level spelling with a ByteLevel pre-tokenizer and decoder, because
    `AutoTokenizer.from_pretrained` on a directory whose config says `qwen2` rebuilds the
    tokenizer as a byte-level `Qwen2Tokenizer` from the saved vocabulary: with this spelling
    both classes give the same ids and decode(encode(s)) == s for ASCII text. Other characters
    become <|unk|> here and are dropped by `Qwen2Tokenizer`; the built-in task is pure ASCII.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [_byte_level(c) for c in CHARACTERS]
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *characters))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
    )


def builtin_model_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """Qwen2 config of the built-in model (~1.06M parameters with the built-in tokenizer)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,  # built-in sequences are under ~200 characters
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Marks the built-in model and every checkpoint trained from it (the attribute is saved in
        # config.json): it was pretrained on bare problems, so `default_instruction` gives none.
        gvmrl_builtin=True,
    )


def default_instruction(model: PreTrainedModel) -> str | None:
    """The instruction appended to problems for `model` unless the user sets one: none for the
    built-in model and checkpoints trained from it, the \\boxed{} instruction for any other."""
    from gvmrl.data import DEFAULT_INSTRUCTION

    return None if getattr(model.config, "gvmrl_builtin", False) else DEFAULT_INSTRUCTION


def cache_root() -> Path:
    """`$GVMRL_CACHE`, else `~/.cache/gvmrl`."""
    return Path(os.environ.get("GVMRL_CACHE") or Path.home() / ".cache" / "gvmrl")


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def builtin_checkpoint(*, build: bool = True, progress: bool = True) -> Path:
    """The cached built-in checkpoint directory, pretraining it on first use (a few CPU minutes).

    Built by `gvmrl.pretrain.pretrain` into a temporary directory renamed into place, under a file
    lock, so concurrent callers wait for one build instead of racing. `build=False` raises
    FileNotFoundError instead of building.
    """
    from gvmrl.io import recover_directory

    path = cache_root() / BUILTIN_VERSION
    recover_directory(path)
    if _is_checkpoint(path):
        return path
    if not build:
        raise FileNotFoundError(
            f"{path}: no built-in checkpoint; run `gvmrl pretrain --output {path}`"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{BUILTIN_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_checkpoint(path):  # another process may have built it while we waited
            from gvmrl.pretrain import pretrain

            pretrain(path, progress=progress)
    return path


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
    """Load a causal LM and tokenizer; `builtin` means the cached built-in checkpoint.

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
