"""Run-time choices shared by `gvmrl train`, `eval` and `stats`: device, dtype and the instruction
appended to each problem, so the three commands resolve "auto" the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gvmrl.config import ConfigError
from gvmrl.data import DEFAULT_INSTRUCTION

if TYPE_CHECKING:
    from transformers import PreTrainedModel

AUTO = "auto"


def resolve_device(name: str = AUTO) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; anything else as torch spells it.

    A device this machine does not have is a ConfigError naming `device` (one line at the
    command line, before any weights load) rather than a CUDA traceback from inside `model.to`.
    """
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None  # not a device name torch knows
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ConfigError(
                f"device: {name} asked for, but torch {torch.__version__} sees no GPU"
            )
        if device.index is not None and device.index >= visible:
            raise ConfigError(f"device: {name} asked for, but {visible} GPU(s) are visible")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on a CPU (where bfloat16 matmuls are slow); else the
    torch dtype of that name."""
    if name == AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def instruction_for(model: PreTrainedModel, setting: str | None = AUTO) -> str | None:
    """The instruction appended to problems for `model`: `setting` itself, or for `auto` none for
    the built-in model and checkpoints trained from it (they were pretrained on bare problems;
    the config attribute `gvmrl_builtin` marks them) and the \\boxed{} instruction for any other."""
    if setting != AUTO:
        return setting
    return None if getattr(model.config, "gvmrl_builtin", False) else DEFAULT_INSTRUCTION
