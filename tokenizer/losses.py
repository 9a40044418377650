"""WinTok training losses as the released code weighs them; LPIPS when a perceptual model is given, an optional
edge term; the adversarial term lives in the trainer (it needs the discriminator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenizer.model import WinTokForwardOutput


@dataclass
class TokenizerLosses:
    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    vq: torch.Tensor
    entropy: torch.Tensor
    distill: torch.Tensor
    edge: torch.Tensor
    perceptual: torch.Tensor
    teacher_features: torch.Tensor
    consistency: torch.Tensor
    reconstruction: torch.Tensor
    """The weighted pixel terms (L1, L2, edge, perceptual, teacher features): what the GAN's adaptive weight is
    measured against."""
    distill_tokens: torch.Tensor

    def scalars(self) -> dict[str, float]:
        names = ("total", "l1", "l2", "vq", "entropy", "distill", "distill_tokens", "edge", "perceptual",
                 "teacher_features", "consistency")
        return {f"loss/{k}": float(getattr(self, k).detach()) for k in names}


def edge_loss(rec: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and the vertical neighbour differences of two image batches."""
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (images[..., :, 1:] - images[..., :, :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (images[..., 1:, :] - images[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def feature_distance(rec_maps: list[torch.Tensor], ref_maps: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS without learned weights: squared distance of channel-normalised feature maps, mean over positions,
    summed over stages, mean over the batch."""
    total = rec_maps[0].new_zeros(())
    for a, b in zip(rec_maps, ref_maps):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-6)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-6)
        total = total + (a - b).pow(2).sum(1).mean()
    return total


_HASH_COEFFICIENTS: dict[int, torch.Tensor] = {}


def _hash_coefficients(n: int) -> torch.Tensor:
    if n not in _HASH_COEFFICIENTS:  # odd, fixed: the same key for the same pixels in every run
        gen = torch.Generator().manual_seed(0x5A17)
        _HASH_COEFFICIENTS[n] = torch.randint(0, 2 ** 62, (n,), generator=gen, dtype=torch.int64) * 2 + 1
    return _HASH_COEFFICIENTS[n]


def identical_patch_groups(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a batch's patches hold exactly the same pixels: a group id per patch (B·L,), image-major, and each
    group's size. Patches are keyed by a fixed random linear hash of their float bits (int64 arithmetic, exact), then
    grouped by a 1-D ``torch.unique``; ``unique(dim=0)`` over the patch rows costs ~8× more. Two different patches
    share a key with probability ~2⁻⁶⁴ a pair."""
    patches = F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2) + 0.0  # + 0.0: −0.0 → 0.0
    bits = patches.contiguous().view(torch.int32).to(torch.int64)  # (B, L, D)
    key = (bits * _hash_coefficients(bits.shape[-1]).to(bits.device)).sum(-1).flatten()  # wraps around: still exact
    _, group, counts = torch.unique(key, return_inverse=True, return_counts=True)
    return group, counts


class _GroupSpread(torch.autograd.Function):
    """Mean over the rows in ``rows`` of the squared distance of each row's softmax(scale · x) to its group's mean,
    per sub-codebook (÷ C). ``x`` (N, C, K); ``rows`` (M,) indices; ``group`` (M,) ids in [0, G); ``counts`` (G,).
    Forward and backward written out: autograd's version of the same arithmetic (with ``unique(dim=0)``) cost 3x as
    much at two threads (``scripts/bench/patch_consistency.py``), ~15% of a WinTok step.
    The group mean needs no gradient of its own: a group's deviations from its mean sum to zero."""

    @staticmethod
    def forward(ctx, x, scale, rows, group, counts):
        prob = (x.float() * scale).softmax(-1)  # (N, C, K)
        member = prob[rows]  # (M, C, K)
        mean = member.new_zeros((counts.numel(), *member.shape[1:])).index_add_(0, group, member)
        mean /= counts.to(mean.dtype)[:, None, None]
        diff = member.sub_(mean[group])
        denom = rows.numel() * x.shape[1]
        ctx.save_for_backward(prob, rows, diff)
        ctx.scale, ctx.denom, ctx.dtype = scale, denom, x.dtype
        return diff.pow(2).sum() / denom

    @staticmethod
    def backward(ctx, grad_out):
        prob, rows, diff = ctx.saved_tensors
        grad_prob = torch.zeros_like(prob)
        grad_prob[rows] = diff * (2.0 * grad_out / ctx.denom)
        grad_x = prob * (grad_prob - (prob * grad_prob).sum(-1, keepdim=True))  # softmax's backward
        return (grad_x * ctx.scale).to(ctx.dtype), None, None, None, None


def patch_consistency_loss(images: torch.Tensor, sim: torch.Tensor, patch_size: int,
                           temperature: float, min_share: float = 0.0) -> torch.Tensor:
    """Identical patches → the same code distribution: the squared distance of each patch's soft code assignment
    (softmax of 2·sim/τ per sub-codebook) to the mean over the patches of the batch with exactly the same pixels.

    WinTok's encoder attends over the whole image, so a flat background patch gets codes that depend on what is
    elsewhere; an autoregressive model must then predict that context before drawing it. ``sim`` (B, C, L, K).
    ``min_share`` > 0 restricts it to groups holding at least that share of the batch's patches (a flat background),
    leaving the codes of smaller groups (object interiors) free."""
    b, c, n, k = sim.shape
    group, counts = identical_patch_groups(images, patch_size)
    kept = counts > max(1, min_share * b * n)  # per group
    if not bool(kept.any()):
        return sim.new_zeros(()).float()
    rows = kept[group].nonzero().flatten()
    compact = (kept.cumsum(0) - 1)[group[rows]]  # the kept groups numbered 0, 1, …
    x = sim.transpose(1, 2).reshape(b * n, c, k)  # a patch's rows of logits together
    return _GroupSpread.apply(x, 2.0 / temperature, rows, compact, counts[kept])


def entropy_loss(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample entropy minus codebook entropy, averaged over sub-codebooks.

    ``sim`` (B, C, L, K) are cosine similarities of unit vectors; the released code uses −‖z − e‖² / τ as logits,
    which for unit vectors is (2·sim − 2) / τ — the same softmax as 2·sim / τ.
    """
    logits = 2.0 * sim.float() / temperature  # (B, C, L, K)
    logits = logits.permute(1, 0, 2, 3).flatten(1, 2)  # (C, B·L, K)
    prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
    per_sample = (-(prob * log_prob).sum(-1)).mean(-1)  # (C,)
    avg = prob.mean(1)  # (C, K)
    codebook = -(avg * torch.log(avg + 1e-7)).sum(-1)  # (C,)
    return (per_sample - codebook).mean()


def _square_side(n: int, what: str) -> int:
    side = round(n ** 0.5)
    if side * side != n:
        raise ValueError(f"loss.distill_tokens: needs square token grids, got {n} {what}; set "
                         f"model.overrides.num_semantic_tokens to a square (16, 64, 256)")
    return side


def pool_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """A square grid of tokens (B, T, D), row-major, average-pooled to a square grid of ``n`` (unchanged when T = n)."""
    side_t, side_n = _square_side(tokens.shape[1], "teacher tokens"), _square_side(n, "semantic tokens")
    if side_t == side_n:
        return tokens
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side_t, side_t)
    return F.adaptive_avg_pool2d(grid.float(), side_n).flatten(2).transpose(1, 2)


def token_distillation(semantic: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """1 − cos between each semantic token and the teacher's token of the same region, mean over tokens.

    ``semantic`` (B, N, D), ``teacher_tokens`` (B, T, D), both square grids (row-major); the teacher's grid is
    average-pooled to N cells (:func:`pool_tokens`; the trainer pools once, before caching), so semantic token i
    stands for the i-th region of the image."""
    target = pool_tokens(teacher_tokens, semantic.shape[1])
    return (1.0 - F.cosine_similarity(semantic.float(), target.float(), dim=-1)).mean()


def tokenizer_losses(out: WinTokForwardOutput, images: torch.Tensor, teacher_emb: torch.Tensor | None, weights,
                     perceptual_model: torch.nn.Module | None = None,
                     teacher: torch.nn.Module | None = None, patch_size: int | None = None,
                     teacher_tokens: torch.Tensor | None = None) -> TokenizerLosses:
    """``weights``: a TokenizerLossConfig. The distillation terms (pooled, and per token with ``teacher_tokens``)
    touch only the semantic tokens; the teacher-feature term (``teacher`` with ``feature_maps``, weight
    ``teacher_features``) reaches the reconstruction only."""
    rec = out.reconstruction.float()
    zero = rec.new_zeros(())
    l1 = (rec - images).abs().mean()
    l2 = F.mse_loss(rec, images)
    edge = edge_loss(rec, images) if weights.edge > 0 else zero
    use_lpips = perceptual_model is not None and weights.perceptual > 0
    perceptual = perceptual_model(rec, images).mean() if use_lpips else zero
    if teacher is not None and weights.teacher_features > 0:
        with torch.no_grad():
            ref_maps = teacher.feature_maps(images.float())
        teacher_feat = feature_distance(teacher.feature_maps(rec), ref_maps)
    else:
        teacher_feat = zero
    q = out.quantizer
    if q.logits is None and (weights.entropy > 0 or weights.patch_consistency > 0):
        raise ValueError("loss.entropy / loss.patch_consistency read the quantizer's logits, which a forward without "
                         "gradients does not keep; run the forward with gradients enabled")
    vq = weights.commitment_beta * q.commitment_loss + q.codebook_loss
    ent = entropy_loss(q.logits, weights.entropy_temp) if weights.entropy > 0 else zero
    consistency = (patch_consistency_loss(images, q.logits, patch_size, weights.entropy_temp,
                                          weights.patch_consistency_min_share)
                   if weights.patch_consistency > 0 and patch_size else zero)
    if teacher_emb is not None and weights.distill > 0:
        distill = (1.0 - F.cosine_similarity(out.pooled.float(), teacher_emb.float(), dim=-1)).mean()
    else:
        distill = zero
    if teacher_tokens is not None and weights.distill_tokens > 0:
        distill_tokens = token_distillation(out.semantic_tokens, teacher_tokens)
    else:
        distill_tokens = zero
    recon = (weights.l1 * l1 + weights.l2 * l2 + weights.edge * edge + weights.teacher_features * teacher_feat
             + (weights.perceptual * perceptual if use_lpips else zero))
    total = (recon + weights.vq * vq + weights.entropy * ent + weights.distill * distill
             + weights.distill_tokens * distill_tokens + weights.patch_consistency * consistency)
    return TokenizerLosses(total, l1, l2, vq, ent, distill, edge, perceptual, teacher_feat, consistency, recon,
                           distill_tokens)
