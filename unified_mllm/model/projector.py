"""Understanding projector: WinTok features → LLM embeddings for the <image> slots."""

from __future__ import annotations

import torch
from torch import nn

from unified_mllm.model.config import UnifiedConfig


def _mlp(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"unknown projector type {kind!r} (valid: linear, mlp2x_gelu)")


class UnderstandingProjector(nn.Module):
    """semantic: N projected semantic tokens; pixel: P summed sub-code embeddings, projected; both: N + P; plus a
    learned embedding per slot when ``projector_slot_embedding``."""

    def __init__(self, config: UnifiedConfig, hidden_size: int):
        super().__init__()
        v = config.vision
        self.mode = config.understanding_input
        if self.mode in ("semantic", "both"):
            self.semantic = _mlp(config.projector_type, v.semantic_dim, hidden_size)
        if self.mode in ("pixel", "both"):
            self.code_embed = nn.ModuleList(nn.Embedding(v.codebook_size, hidden_size) for _ in range(v.num_codebooks))
            self.pixel = _mlp(config.projector_type, hidden_size, hidden_size)
        self.slot_embed = (nn.Parameter(torch.randn(config.num_und_slots, hidden_size) * 0.02)
                           if config.projector_slot_embedding else None)

    def forward(self, semantic: torch.Tensor | None, pixel_codes: torch.Tensor | None) -> torch.Tensor:
        """semantic (M, N, Ds), pixel_codes (M, C, P) → (M, K, H) with K the number of slots per image."""
        parts = []
        if self.mode in ("semantic", "both"):
            if semantic is None:
                raise ValueError("understanding_input needs semantic tokens (und_semantic) for every image")
            # features arrive in fp32 (WinTok, the pretokenize cache); the projector may be bf16 (DeepSpeed bf16)
            dtype = next(self.semantic.parameters()).dtype
            parts.append(self.semantic(semantic.to(dtype)))  # (M, N, H)
        if self.mode in ("pixel", "both"):
            if pixel_codes is None:
                raise ValueError("understanding_input needs pixel codes (und_pixel_codes) for every image")
            emb = sum(e(pixel_codes[:, i]) for i, e in enumerate(self.code_embed))  # (M, P, H)
            parts.append(self.pixel(emb))
        out = torch.cat(parts, dim=1)
        return out if self.slot_embed is None else out + self.slot_embed.to(out.dtype)
