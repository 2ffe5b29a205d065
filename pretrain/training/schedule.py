"""Learning-rate schedules as a multiplier of the peak lr, a pure function of the step.

    wsd (trapezoid)  linear warm-up over warmup_frac of the steps, constant, then linear decay to min_lr_ratio
                     over the last decay_frac of the steps (the MoR paper's recipe: ~5 % warm-up, ~20 % decay)
    cosine           linear warm-up, then half a cosine from 1 down to min_lr_ratio at the last step
    constant         linear warm-up, then 1

Step numbering: the multiplier for optimizer step ``step`` (0-based) of ``total``.
"""
from __future__ import annotations

import math

from pretrain.config import ScheduleConfig


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    warmup = int(round(cfg.warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(1, total - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = int(round(cfg.decay_frac * total))
    decay_start = total - decay
    if step < decay_start or decay == 0:
        return 1.0
    progress = (step - decay_start + 1) / decay  # reaches the floor at the last step
    return 1.0 - (1.0 - floor) * progress
