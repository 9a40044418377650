"""Sampling from logits: temperature, top-k, top-p, one seeded generator per row (a row's draws do not depend on
which other rows share its batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely entries (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of entries whose probability reaches p (1: all)."""

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N, K) logits → temperature-scaled logits with the entries outside top-k / top-p set to −inf."""
    logits = logits.float() / max(params.temperature, 1e-6)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # entries after the set that reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def make_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, row i seeded with seed + i."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """(N, K) logits → (N,) sampled indices: row i draws what ``torch.multinomial(probs[i], 1, generator=g_i)`` draws.

    That call is argmax(p / q) with q ~ Exp(1) drawn from g_i (torch's one-sample path); here each row draws its q
    from its own generator and the division and argmax run once for the batch, without multinomial's per-call checks
    (three reductions and a host sync per row: 18% of the eval's image generation, NOTES.md, session 31)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or bool((probs.sum(-1) <= 0).any()):
        raise ValueError("sampling: the logits give no valid distribution (NaN or infinite values, or every entry "
                         "filtered out); check the checkpoint's weights")
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators, strict=True):
        row.exponential_(1, generator=generator)
    return (probs / q).argmax(-1)
