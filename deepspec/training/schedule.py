"""Learning-rate schedules as multipliers of the peak lr, a pure function of the step.

- cosine: linear warmup, then cosine from 1 to `min_lr_ratio` (DeepSpec's reference).
- wsd (warmup-stable-decay): warmup, flat at 1, then a linear decay to `min_lr_ratio`
  over the last `decay_ratio` of the steps.
- constant: warmup, then flat.

Being a function of the step alone, the schedule resumes exactly from a step count.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(step: int, total_steps: int, schedule: str = "cosine", warmup_ratio: float = 0.04,
                  min_lr_ratio: float = 0.0, decay_ratio: float = 0.1) -> float:
    """lr(step) / peak lr for optimizer step `step` (0-based) of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.schedule={schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; a schedule needs at least one step")
    warmup = int(round(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_steps - warmup - 1, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay = max(int(round(decay_ratio * total_steps)), 1)
    decay_start = total_steps - decay
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay, 1.0)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def make_lr_lambda(total_steps: int, schedule: str, warmup_ratio: float, min_lr_ratio: float,
                   decay_ratio: float) -> Callable[[int], float]:
    """The multiplier as a one-argument function (for torch's LambdaLR)."""
    lr_multiplier(0, total_steps, schedule, warmup_ratio, min_lr_ratio, decay_ratio)  # validate now

    def f(step: int) -> float:
        return lr_multiplier(step, total_steps, schedule, warmup_ratio, min_lr_ratio, decay_ratio)

    return f
