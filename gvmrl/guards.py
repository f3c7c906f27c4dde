"""The non-finite guard: a NaN or infinite loss or gradient never reaches the weights.

One optimizer step on a NaN gradient turns every parameter (and AdamW's moment estimates) NaN,
and every checkpoint after it is useless. So the M-step asks `NonFiniteGuard.admit` before each
optimizer step: a step whose loss or gradient norm is not finite is skipped and counted, and after
`max_skipped_steps` skipped steps in a row the run stops with `NonFiniteError`, since
skipping no longer helps (a diverged policy, a reward that is NaN for every sample).
`save_checkpoint` refuses weights that `first_non_finite` finds, keeping the last good checkpoint.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used, so the CLI can import the error class fast
    import torch


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot step past; the message says what to change."""


class NonFiniteGuard:
    """Decides per optimizer step whether to apply it; counts skipped steps.

    `skipped` counts every skipped step of the guard's lifetime and `in_a_row` the current run of
    consecutive ones; store both with the trainer state to carry them across a resume.
    """

    def __init__(self, max_skipped_steps: int, *, skipped: int = 0, in_a_row: int = 0):
        if max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = skipped
        self.in_a_row = in_a_row

    def admit(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor) -> bool:
        """True: apply the step. False: skip it (zero the gradients, do not step the optimizer).

        Raises NonFiniteError on the `max_skipped_steps`-th skipped step in a row.
        """
        loss, grad_norm = float(loss), float(grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skipped_steps:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(last: loss={loss}, grad_norm={grad_norm}), so the run stops "
                f"(optim.max_skipped_steps={self.max_skipped_steps}); the last checkpoint holds "
                "the last finite weights: lower optim.lr, or check the rewards for NaN"
            )
        return False


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding a NaN or inf, or None.
    A sharded (FSDP2) model is checked on this rank's shards only, without communication."""
    import torch
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None
