"""Input embedding of generated pixel positions (each position = C sub-codes)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.attn_projection import AttnProjection
from unified_mllm.model.config import UnifiedConfig


class GridPositionEmbedding(nn.Module):
    """A learned row and column embedding of the grid position each generation slot's output predicts (slot p holds
    the code of position p and predicts p + 1; the last slot's "next" is the row past the grid).

    The LLM's rotary positions only say how far apart two tokens are; with captions of varying length, knowing which
    row and column comes next means counting back to <boi>. Image-token transformers (DALL·E, Parti) add row and
    column embeddings for that reason; here they make "the token below" one lookup instead of something to learn.
    """

    def __init__(self, num_positions: int, hidden_size: int):
        super().__init__()
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(f"model.generation.position_embedding needs a square token grid; this WinTok has "
                             f"{num_positions} positions per image")
        self.side = side
        self.row = nn.Parameter(torch.randn(side + 1, hidden_size))  # + the row past the grid (after the last slot)
        self.col = nn.Parameter(torch.randn(side, hidden_size))

    def forward(self, num_slots: int, first: int = 0) -> torch.Tensor:
        """(P, H) for slots ``first`` … ``num_slots`` − 1."""
        nxt = torch.arange(first + 1, num_slots + 1, device=self.row.device)
        return self.row[nxt // self.side] + self.col[nxt % self.side]


def _grid(config: UnifiedConfig, hidden_size: int) -> GridPositionEmbedding | None:
    return GridPositionEmbedding(config.vision.num_positions, hidden_size) if config.gen_position_embedding else None


class SumCodeEmbedding(nn.Module):
    """LlamaGen style: the sum of one embedding per sub-codebook (+ the grid position, when configured)."""

    def __init__(self, config: UnifiedConfig, hidden_size: int):
        super().__init__()
        v = config.vision
        self.embeds = nn.ModuleList(nn.Embedding(v.codebook_size, hidden_size) for _ in range(v.num_codebooks))
        self.grid = _grid(config, hidden_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (G, C, P) → (G, P, H)."""
        out = sum(e(codes[:, i]) for i, e in enumerate(self.embeds))
        return out if self.grid is None else out + self.grid(codes.shape[2]).to(out.dtype)

    def last(self, codes: torch.Tensor) -> torch.Tensor:
        """``forward(codes)[:, -1:]``, (G, 1, H), from the last position's codes alone (each position's embedding
        depends on its own codes only): sampling adds one position at a time."""
        out = sum(e(codes[:, i, -1:]) for i, e in enumerate(self.embeds))
        p = codes.shape[2]
        return out if self.grid is None else out + self.grid(p, first=p - 1).to(out.dtype)


class CausalProjEmbedding(nn.Module):
    """UniTok/Liquid style: WinTok codebook lookup → a causal copy of WinTok's post-quant projection → Linear."""

    def __init__(self, config: UnifiedConfig, hidden_size: int, proj_heads: int = 4):
        super().__init__()
        v = config.vision
        quant_dim = v.num_codebooks * v.codebook_dim
        self.num_codebooks = v.num_codebooks
        self.codebooks = nn.Parameter(torch.zeros(v.num_codebooks, v.codebook_size, v.codebook_dim),
                                      requires_grad=False)  # copied from the frozen WinTok
        self.proj = AttnProjection(quant_dim, v.wintok_hidden_size, proj_heads, causal=True)
        self.out = nn.Linear(v.wintok_hidden_size, hidden_size)
        self.grid = _grid(config, hidden_size)

    @torch.no_grad()
    def init_from_wintok(self, wintok) -> None:
        for i in range(self.num_codebooks):
            self.codebooks[i].copy_(wintok.quantizer.codebooks[i].codebook.weight)
        self.proj.load_state_dict(wintok.post_quant_proj.state_dict())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (G, C, P) → (G, P, H)."""
        parts = [F.embedding(codes[:, i], F.normalize(self.codebooks[i], dim=-1)) for i in range(self.num_codebooks)]
        out = self.out(self.proj(torch.cat(parts, dim=-1)))  # (G, P, H)
        return out if self.grid is None else out + self.grid(codes.shape[2]).to(out.dtype)

    def last(self, codes: torch.Tensor) -> torch.Tensor:
        """``forward(codes)[:, -1:]``: the causal projection reads every earlier position."""
        return self(codes)[:, -1:]


def build_gen_embedding(config: UnifiedConfig, hidden_size: int) -> nn.Module:
    registry = {"sum": SumCodeEmbedding, "causal_proj": CausalProjEmbedding}
    if config.gen_embedding not in registry:
        raise ValueError(f"unknown generation embedding {config.gen_embedding!r} (valid: {', '.join(registry)})")
    return registry[config.gen_embedding](config, hidden_size)
