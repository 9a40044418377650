"""Heads that predict the C sub-codes of one pixel position from the LLM hidden state before it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from unified_mllm.model.config import UnifiedConfig


class DepthHead(nn.Module):
    """A small causal transformer over [h, e(c_0), …, e(c_{C−2})]: position k predicts sub-code c_k. Its width is
    ``config.depth_hidden_size`` (0: the LLM's); a narrower head reads h through a linear projection."""

    def __init__(self, config: UnifiedConfig, hidden_size: int, num_heads: int = 4):
        super().__init__()
        v = config.vision
        self.num_codebooks, self.codebook_size = v.num_codebooks, v.codebook_size
        width = config.depth_hidden_size or hidden_size
        heads = num_heads if width % num_heads == 0 else 1
        self.inp = nn.Linear(hidden_size, width) if width != hidden_size else nn.Identity()
        self.code_embed = nn.ModuleList(nn.Embedding(v.codebook_size, width) for _ in range(v.num_codebooks - 1))
        self.pos = nn.Parameter(torch.zeros(v.num_codebooks, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.depth_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, v.codebook_size)

    def _run(self, seq: torch.Tensor) -> torch.Tensor:
        n = seq.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=seq.device, dtype=seq.dtype)
        # Under CPU autocast the 4-position attention runs bf16, where the CPU flash kernel is slow: the plain (math)
        # kernel is 1.6x faster there, forward and backward (NOTES.md, session 24). Elsewhere sdpa picks its kernel.
        slow_flash = seq.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with sdpa_kernel(SDPBackend.MATH) if slow_flash else contextlib.nullcontext():
            h = self.blocks(seq + self.pos[:n], mask=mask, is_causal=True)  # (M, n, W)
        return self.out(self.norm(h))  # (M, n, K)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: hidden (M, H), codes (M, C) → logits (M, C, K)."""
        prefix = [self.inp(hidden)[:, None]] + [self.code_embed[i](codes[:, i])[:, None]
                                                for i in range(self.num_codebooks - 1)]
        return self._run(torch.cat(prefix, dim=1))

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """Logits (M, K) of sub-code k = prefix_codes.shape[1], given the k sub-codes chosen so far (M, k)."""
        k = prefix_codes.shape[1]
        parts = [self.inp(hidden)[:, None]] + [self.code_embed[i](prefix_codes[:, i])[:, None] for i in range(k)]
        return self._run(torch.cat(parts, dim=1))[:, -1]


class ParallelHead(nn.Module):
    """One linear classifier per sub-codebook, all from the same hidden state."""

    def __init__(self, config: UnifiedConfig, hidden_size: int):
        super().__init__()
        v = config.vision
        self.num_codebooks = v.num_codebooks
        self.heads = nn.ModuleList(nn.Linear(hidden_size, v.codebook_size) for _ in range(v.num_codebooks))

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([h(hidden) for h in self.heads], dim=1)  # (M, C, K)

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        return self.heads[prefix_codes.shape[1]](hidden)


def build_gen_head(config: UnifiedConfig, hidden_size: int) -> nn.Module:
    registry = {"depth": DepthHead, "parallel": ParallelHead}
    if config.gen_head not in registry:
        raise ValueError(f"unknown generation head {config.gen_head!r} (valid: {', '.join(registry)})")
    return registry[config.gen_head](config, hidden_size)
