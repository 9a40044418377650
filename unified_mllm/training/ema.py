"""An exponential moving average of a model's trainable weights, kept in fp32 by the process that exports."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def warmed_decay(decay: float, step: int) -> float:
    """The averaging rate after optimizer step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``, a short
    warm-up so the first steps are not averaged with the initial weights (both EMA-keeping trainers use it)."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """``avg ← d·avg + (1 − d)·w`` after every optimizer step, d = ``warmed_decay(decay, step)``.

    Only trainable parameters are averaged (frozen ones never change); the average is fp32 whatever the training
    precision — a bf16 average would drop the (1 − decay)-sized steps below its resolution."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based)."""
        # one fused call over every tensor (this runs inside each training step); .float() of an fp32 weight is itself
        torch._foreach_lerp_(list(self.average.values()), [p.detach().float() for p in self.params.values()],
                             1.0 - warmed_decay(self.decay, step))

    @contextmanager
    def swapped_in(self):
        """The model holds the average inside, its own weights again afterwards (for an export mid-training)."""
        own = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.average[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(own[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
        if missing or unexpected:
            raise ValueError(f"model.ema_decay: the checkpoint's weight average does not match the trainable "
                             f"parameters (missing {missing[:5]}, unexpected {unexpected[:5]}); resume with the "
                             f"settings it was made with, or start a new checkpoint.output_dir")
        for name, t in state.items():
            self.average[name].copy_(t)
