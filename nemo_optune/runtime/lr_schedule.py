"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to min_lr."""

import math


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, decay: str, min_lr: float) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if decay == "linear":
        return base_lr + (min_lr - base_lr) * progress
    raise ValueError(f"unknown lr decay {decay!r} (constant | cosine | linear)")
