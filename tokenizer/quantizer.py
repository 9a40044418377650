"""Multi-codebook cosine vector quantiser (WinTok / UniTok)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / size, 1.0 / size)
        self.register_buffer("vocab_usage", torch.zeros(size))


@dataclass
class QuantizerOutput:
    quant: torch.Tensor
    """(B, L, C·d) normalised code vectors (straight-through gradient to the input)."""
    codes: torch.Tensor
    """(B, C, L) long."""
    commitment_loss: torch.Tensor
    """Mean over codebooks of ||z − sg(q)||²."""
    codebook_loss: torch.Tensor
    """Mean over codebooks of ||sg(z) − q||²."""
    logits: torch.Tensor | None
    """(B, C, L, K) cosine similarities of each chunk to each entry, for the training losses; None where no gradient
    is recorded (encoding for pretokenize or inference: stacking them was ~a third of the quantizer's time)."""


class MultiCodebookQuantizer(nn.Module):
    """Split a (B, L, C·d) vector into C chunks; each picks the entry of largest cosine similarity."""

    def __init__(self, num_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.codebook_dim = num_codebooks, codebook_size, codebook_dim
        self.codebooks = nn.ModuleList(Codebook(codebook_size, codebook_dim) for _ in range(num_codebooks))

    def normalised_codebook(self, i: int) -> torch.Tensor:
        return F.normalize(self.codebooks[i].codebook.weight, dim=-1)  # (K, d)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        chunks = z.float().chunk(self.num_codebooks, dim=-1)  # C × (B, L, d)
        quants, codes, logits = [], [], []
        commit = z.new_zeros((), dtype=torch.float32)
        cb = z.new_zeros((), dtype=torch.float32)
        for i, chunk in enumerate(chunks):
            zn = F.normalize(chunk, dim=-1)  # (B, L, d)
            book = self.normalised_codebook(i).float()  # (K, d), fp32 even in a bf16 copy
            sim = zn @ book.t()  # (B, L, K)
            idx = sim.argmax(dim=-1)  # (B, L)
            q = F.embedding(idx, book)  # (B, L, d)
            commit = commit + F.mse_loss(zn, q.detach())
            cb = cb + F.mse_loss(q, zn.detach())
            # straight-through when training; the exact code vectors otherwise (decode_codes(codes) == decode(quant))
            quants.append(zn + (q - zn).detach() if zn.requires_grad else q)
            codes.append(idx)
            logits.append(sim)
            if self.training:
                with torch.no_grad():
                    usage = torch.bincount(idx.flatten(), minlength=self.codebook_size).float()
                    self.codebooks[i].vocab_usage.mul_(0.99).add_(usage, alpha=0.01)
        n = self.num_codebooks
        return QuantizerOutput(torch.cat(quants, dim=-1), torch.stack(codes, dim=1), commit / n, cb / n,
                               torch.stack(logits, dim=1) if torch.is_grad_enabled() else None)

    def codes_to_quant(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C, L) codes → (B, L, C·d) normalised vectors."""
        parts = [F.embedding(codes[:, i], self.normalised_codebook(i)) for i in range(self.num_codebooks)]
        return torch.cat(parts, dim=-1)
