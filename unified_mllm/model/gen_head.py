"""Heads that predict the C sub-codes of one pixel position from the LLM hidden state before it."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
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

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """Logits (M, K) of sub-code k = prefix_codes.shape[1], given the k sub-codes chosen so far (M, k).

        ``cache``: a list, empty for sub-code 0 and passed again for each next one of the same position; the head then
        runs only the new sub-code's input through its layers, against each layer's keys and values kept there (what
        the full prefix computes, without recomputing the earlier sub-codes)."""
        k = prefix_codes.shape[1]
        if cache is not None:
            if (held := cache[0][0].shape[2] if cache else 0) != k:
                raise ValueError(f"depth head cache holds {held} sub-codes, asked for sub-code {k}")
            x = self.inp(hidden)[:, None] if k == 0 else self.code_embed[k - 1](prefix_codes[:, k - 1])[:, None]
            return self._step(x + self.pos[k], cache)
        parts = [self.inp(hidden)[:, None]] + [self.code_embed[i](prefix_codes[:, i])[:, None] for i in range(k)]
        return self._run(torch.cat(parts, dim=1))[:, -1]

    def _step(self, x: torch.Tensor, cache: list) -> torch.Tensor:
        """One more position (M, 1, W) through the blocks (pre-norm encoder layers, as ``_run``), attending to the
        positions in ``cache`` (layer i's keys and values at ``cache[i]``) and itself; → its logits (M, K)."""
        m, width = x.shape[0], x.shape[-1]
        for i, layer in enumerate(self.blocks.layers):
            attn = layer.self_attn
            heads = attn.num_heads
            q, k, v = (t.view(m, 1, heads, width // heads).transpose(1, 2)
                       for t in F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
            if i < len(cache):
                cache[i] = (torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2))
            else:
                cache.append((k, v))
            o = F.scaled_dot_product_attention(q, *cache[i])  # the newest position sees every earlier one
            x = x + attn.out_proj(o.transpose(1, 2).reshape(m, 1, width))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        return self.out(self.norm(x))[:, -1]


class ParallelHead(nn.Module):
    """One linear classifier per sub-codebook, all from the same hidden state."""

    def __init__(self, config: UnifiedConfig, hidden_size: int):
        super().__init__()
        v = config.vision
        self.num_codebooks = v.num_codebooks
        self.heads = nn.ModuleList(nn.Linear(hidden_size, v.codebook_size) for _ in range(v.num_codebooks))

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([h(hidden) for h in self.heads], dim=1)  # (M, C, K)

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        return self.heads[prefix_codes.shape[1]](hidden)


def build_gen_head(config: UnifiedConfig, hidden_size: int) -> nn.Module:
    registry = {"depth": DepthHead, "parallel": ParallelHead}
    if config.gen_head not in registry:
        raise ValueError(f"unknown generation head {config.gen_head!r} (valid: {', '.join(registry)})")
    return registry[config.gen_head](config, hidden_size)
