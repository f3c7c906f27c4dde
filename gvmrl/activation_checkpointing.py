"""Gradient (activation) checkpointing of a transformers model: keep each decoder layer's input
only and recompute the layer in the backward pass.

Training activations of a Qwen2.5-1.5B-shaped model take about 2.9 MiB per token over its 28
layers; with checkpointing only the layer inputs stay, hidden x 28 layers (~168 KiB
per token in bf16), at the price of one more forward pass. `gvmrl.memory` estimates both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Turn checkpointing on for every decoder layer (config key `gradient_checkpointing`).

    Non-reentrant checkpointing (`use_reentrant=False`, what torch recommends) needs no input
    that requires grad and works with frozen embeddings. transformers applies it only in training
    mode, so rollouts and no-grad passes (`model.eval()`) keep their KV cache and speed.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_gradient_checkpointing(model: PreTrainedModel) -> bool:
    """Whether checkpointing is on, under either of transformers' names."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is not None:
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)
