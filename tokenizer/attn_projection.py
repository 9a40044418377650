"""AttnProjection (shared by WinTok and UniTok): attention + residual projection + GeGLU MLP, in → out width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainAttention(nn.Module):
    """Multi-head attention from ``in_dim`` to ``out_dim`` (qkv width max(in, out)), no mask unless causal.

    in > out: the heads are averaged and the head width is pooled to ``out_dim``; in ≤ out: heads are concatenated.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        inner = max(in_dim, out_dim)
        self.head_dim = inner // num_heads
        self.qkv = nn.Linear(in_dim, inner * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, L, 3·inner)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, hd)
        if self.in_dim > self.out_dim:
            y = y.mean(dim=1)  # (B, L, hd)
            if self.head_dim != self.out_dim:
                y = F.adaptive_avg_pool1d(y, self.out_dim)  # (B, L, out)
        else:
            y = y.transpose(1, 2).reshape(B, L, -1)  # (B, L, out)
        return self.proj(y)


class GeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class AttnProjection(nn.Module):
    """``y = proj(norm3(x)) + attn(norm1(x)); y = y + mlp(norm2(y))``."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False, norm_eps: float = 1e-5,
                 mlp_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=norm_eps)
        self.attn = PlainAttention(in_dim, out_dim, num_heads, causal=causal)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(out_dim, eps=norm_eps)
        self.mlp = GeGLU(out_dim, 2 * out_dim, eps=mlp_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)  # WinTok feeds fp32 (its quantizer runs in fp32) into a possibly bf16 copy
        y = self.proj(self.norm3(x)) + self.attn(self.norm1(x))  # (B, L, out)
        return y + self.mlp(self.norm2(y))
