"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from unified_mllm.config.stage import OptimConfig


def lr_factor(step: int, optim: OptimConfig) -> float:
    warmup = int(round(optim.warmup_ratio * optim.max_steps))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, optim.max_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def build_scheduler(optimizer: Optimizer, optim: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim))
