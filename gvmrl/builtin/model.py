"""The built-in tiny model: a character-level tokenizer and a ~1.06M-parameter Qwen2 config.

It is what runs everywhere without downloads: the tokenizer is built with `tokenizers`, the
model is a Qwen2 of hidden size 128, 4 layers, 4 heads, MLP 512 and tied embeddings (2 layers
learned only 1-2-step chains). Its pretrained weights ship with the package (`builtin_checkpoint()`,
a normal Hugging Face checkpoint directory that `from_pretrained` loads), so every machine starts
from the same weights: pretraining on each machine gave different weights (float round-off differs
between CPUs) and so different runs from them. `gvmrl.builtin.pretrain` rebuilds them.

Prompts for the built-in model use no instruction (`format_prompt(tok, problem, None)`): a
character-level model pays one token per character, and the 70-character instruction would
double the sequence length without telling it anything its training did not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Config

BUILTIN = "builtin"

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
    """GPT-2 byte-level spelling of ASCII text: space is `Ġ`, newline `Ċ`, other printables
    stay."""
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
        # config.json): it was pretrained on bare problems, so `gvmrl.runtime` appends no
        # instruction.
        gvmrl_builtin=True,
    )


def builtin_checkpoint() -> Path:
    """The shipped checkpoint directory of the built-in model (package data; written by
    `gvmrl pretrain` with its defaults). Replace its files to ship a rebuilt model."""
    return Path(__file__).with_name("weights")
