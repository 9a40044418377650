"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from unified_mllm.config.stage import OptimConfig


def lr_factor(step: int, optim: OptimConfig, floor: float | None = None) -> float:
    """The scheduled lr at ``step`` as a fraction of ``optim.lr``; ``floor`` replaces ``optim.min_lr_ratio``."""
    floor = optim.min_lr_ratio if floor is None else floor
    warmup = int(round(optim.warmup_ratio * optim.max_steps))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, optim.max_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * cosine


def task_floor_scale(step: int, optim: OptimConfig, task: str) -> float:
    """How much a ``task`` step's lr differs from the schedule's at ``step`` when ``optim.task_min_lr_ratio`` gives that
    task its own cosine floor: 1 during warm-up, then the ratio of the two cosines."""
    floor = optim.task_min_lr_ratio.get(task)
    if floor is None or floor == optim.min_lr_ratio:
        return 1.0
    return lr_factor(step, optim, floor) / max(lr_factor(step, optim), 1e-12)


def build_scheduler(optimizer: Optimizer, optim: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim))
