"""The learning-rate schedule as plain Python: the MLX backend's copy of optax's (tested equal)."""

from __future__ import annotations

import math

from dsjax.config import TrainingConfig


def learning_rate(t: TrainingConfig, step: int) -> float:
    """lr used for optimizer step `step` (0-based), matching dsjax.train.optimizer.lr_schedule."""
    peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
    warmup = min(t.warmup_steps, t.max_steps)
    rest = max(t.max_steps - warmup, 1)
    if step < warmup:
        start = peak / warmup
        span = warmup - 1
        return peak if span <= 0 else start + (peak - start) * min(step, span) / span
    s = step - warmup
    if t.lr_schedule == "cosine":
        progress = min(s, rest) / rest
        return peak * ((1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)) + t.min_lr_ratio)
    if t.lr_schedule == "wsd":
        decay = max(int(round(rest * t.wsd_decay_fraction)), 1)
        if s < rest - decay:
            return peak
        return peak + (floor - peak) * min(s - (rest - decay), decay) / decay
    return peak
