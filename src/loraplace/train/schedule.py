"""How long a trial trains and at what learning rate: torch-free, so the tracking mirror can redraw it.

Usage::

    total = total_steps(spec, n_train=500)           # optimizer steps of the whole run
    lr = spec.lr * lr_factor(step, total, spec)      # at 0-based step
"""

from __future__ import annotations

import math

from loraplace.core.config import TrainSpec


# -- training ----------------------------------------------------------------------------------
def total_steps(spec: TrainSpec, n_train: int) -> int:
    if spec.epochs is not None:
        return max(1, math.ceil(spec.epochs * n_train / spec.batch_size))
    return spec.steps


def lr_factor(step: int, total: int, spec: TrainSpec) -> float:
    """Multiplier of the peak lr at a 0-based step: linear warm-up then constant/linear/cosine decay."""
    warm = int(spec.warmup * total) if spec.warmup < 1 else int(spec.warmup)
    if step < warm:
        return (step + 1) / warm
    if spec.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 1.0 - progress if spec.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
