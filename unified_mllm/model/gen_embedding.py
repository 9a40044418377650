"""Input embedding of generated pixel positions (each position = C sub-codes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.attn_projection import AttnProjection
from unified_mllm.model.config import UnifiedConfig


class SumCodeEmbedding(nn.Module):
    """LlamaGen style: the sum of one embedding per sub-codebook."""

    def __init__(self, config: UnifiedConfig, hidden_size: int):
        super().__init__()
        v = config.vision
        self.embeds = nn.ModuleList(nn.Embedding(v.codebook_size, hidden_size) for _ in range(v.num_codebooks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (G, C, P) → (G, P, H)."""
        return sum(e(codes[:, i]) for i, e in enumerate(self.embeds))


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

    @torch.no_grad()
    def init_from_wintok(self, wintok) -> None:
        for i in range(self.num_codebooks):
            self.codebooks[i].copy_(wintok.quantizer.codebooks[i].codebook.weight)
        self.proj.load_state_dict(wintok.post_quant_proj.state_dict())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (G, C, P) → (G, P, H)."""
        parts = [F.embedding(codes[:, i], F.normalize(self.codebooks[i], dim=-1)) for i in range(self.num_codebooks)]
        return self.out(self.proj(torch.cat(parts, dim=-1)))  # (G, P, H)


def build_gen_embedding(config: UnifiedConfig, hidden_size: int) -> nn.Module:
    registry = {"sum": SumCodeEmbedding, "causal_proj": CausalProjEmbedding}
    if config.gen_embedding not in registry:
        raise ValueError(f"unknown generation embedding {config.gen_embedding!r} (valid: {', '.join(registry)})")
    return registry[config.gen_embedding](config, hidden_size)
