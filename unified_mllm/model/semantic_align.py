"""Representation alignment for generation: an MLP from the LLM's hidden state before each generation slot to the
WinTok semantic tokens of the image being drawn (REPA, Yu et al. 2025; ARRA, Xie et al. 2025). A training-time loss
module: it is attached by the stage that asks for it and is not part of an export."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SemanticAlign(nn.Module):
    def __init__(self, hidden_size: int, semantic_dim: int, target: str, layer: int, num_positions: int,
                 num_semantic_tokens: int, center: bool = False, momentum: float = 0.99):
        super().__init__()
        self.target, self.layer, self.center, self.momentum = target, layer, center, momentum
        if center:  # the running mean of the targets: in training checkpoints, so a resumed run continues it
            self.register_buffer("target_mean", torch.zeros(semantic_dim))
            self.register_buffer("target_seen", torch.zeros(()))  # 0 until the first batch sets the mean outright
        self.proj = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(),
                                  nn.Linear(2 * hidden_size, semantic_dim))
        if target == "grid":
            side, cells = math.isqrt(num_positions), math.isqrt(num_semantic_tokens)
            if side * side != num_positions or cells * cells != num_semantic_tokens or side % cells:
                raise ValueError(f"model.generation.semantic_align.target: grid needs square grids of pixel positions "
                                 f"and semantic tokens, the second dividing the first; this WinTok has "
                                 f"{num_positions} positions and {num_semantic_tokens} semantic tokens — use pooled")
            pos = torch.arange(num_positions)
            cell = (pos // side) * cells // side * cells + (pos % side) * cells // side
            self.register_buffer("cell", cell, persistent=False)  # (P,) the semantic token of each position
        elif target != "pooled":
            raise ValueError(f"model.generation.semantic_align.target: unknown {target!r} (valid: pooled, grid)")

    def forward(self, hidden: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """hidden (S, H) before each slot, in slot order (image-major); semantic (G, N, D) of the G images drawn, with
        S = G · P → 1 − cos, mean over slots."""
        g = semantic.shape[0]
        per_image = hidden.shape[0] // max(g, 1)
        if g == 0 or per_image * g != hidden.shape[0] or (self.target == "grid" and per_image > len(self.cell)):
            raise ValueError(f"semantic_align: {hidden.shape[0]} generation slots for {g} images")
        if self.target == "pooled":
            target = semantic.float().mean(1, keepdim=True).expand(g, per_image, semantic.shape[-1])
        else:
            target = semantic.float()[:, self.cell[:per_image]]  # (G, P, D)
        if self.center:
            if self.training:
                with torch.no_grad():  # tensor ops only: no host sync in the training step
                    keep = self.target_seen * self.momentum
                    self.target_mean.mul_(keep).add_(target.mean((0, 1)) * (1.0 - keep))
                    self.target_seen.fill_(1.0)
            target = target - self.target_mean
        pred = self.proj(hidden).float()
        return 1.0 - F.cosine_similarity(pred, target.reshape(-1, target.shape[-1]), dim=-1).mean()
