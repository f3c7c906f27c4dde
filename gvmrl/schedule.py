"""The learning-rate schedule of every optimizer in gvmrl: linear warm-up, then constant or cosine
decay to a floor, as a multiplier of the peak rate (`torch.optim.lr_scheduler.LambdaLR`).

Used by the RL trainer (floor 0, over the run's expected optimizer steps) and by the built-in
model's pretraining (floor `MIN_LR_RATIO` of the peak: a warm start for RL, see
`gvmrl.builtin.pretrain`).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str = "cosine", floor: float = 0.0
) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based).

    (step + 1) / warmup_steps during warm-up; then 1 ("constant"), or
    floor + (1 - floor) (1 + cos(pi s)) / 2 with s the share of the decay steps done, capped at 1
    ("cosine": from 1 at the end of warm-up to `floor` at `total_steps` and after).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    floor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`optimizer`'s rates follow `lr_factor`; call `.step()` after each optimizer step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=schedule,
            floor=floor,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
