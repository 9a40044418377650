"""The tokenizer's background term (``tokenizer.losses.patch_consistency_loss``: hashed patch groups, a written-out
backward) against its plain form (``torch.unique(dim=0)`` over the patch rows, autograd through every step), on the
ShapeWorld preset's shapes: forward + backward time of one batch, the ratio plain / ours, and the largest gradient
difference.

    python scripts/bench/patch_consistency.py [--repeat 50] [--threads 1]

The images are flat backgrounds with one to three boxes (uint8 colours scaled to [-1, 1], as the data stream gives
them): batch 16 of 64 × 64, patch 8, 4 sub-codebooks of 256 entries, min_share 0.2, as the preset. Both forms run
alternately after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def plain_form(images: torch.Tensor, sim: torch.Tensor, patch_size: int, temperature: float,
               min_share: float) -> torch.Tensor:
    b, c, n, k = sim.shape
    patches = F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2).reshape(b * n, -1)
    _, group, counts = torch.unique(patches, dim=0, return_inverse=True, return_counts=True)
    shared = counts[group] > max(1, min_share * b * n)
    prob = (2.0 * sim.float() / temperature).softmax(-1).permute(0, 2, 1, 3).reshape(b * n, c * k)[shared]
    g = group[shared]
    mean = prob.new_zeros(counts.numel(), c * k).index_add_(0, g, prob) / counts[:, None].to(prob.dtype)
    return (prob - mean[g]).pow(2).sum(-1).mean() / c


def scenes(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    images = torch.full((batch, 3, size, size), 235.0)
    for i in range(batch):
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            x, y = torch.randint(0, size - 16, (2,), generator=gen).tolist()
            w, h = torch.randint(6, 16, (2,), generator=gen).tolist()
            images[i, :, y:y + h, x:x + w] = torch.randint(0, 256, (3, 1, 1), generator=gen).float()
    return images / 127.5 - 1.0


def main() -> int:
    from tokenizer.losses import patch_consistency_loss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    images = scenes(16, 64, gen)
    sim = (torch.randn(16, 4, 64, 256, generator=gen) * 0.3).requires_grad_()
    forms = {"plain": plain_form, "ours": patch_consistency_loss}
    grads, times = {}, {name: 0.0 for name in forms}
    for rep in range(a.repeat + 3):  # three warm-up rounds
        for name, form in forms.items():
            t0 = time.perf_counter()
            (grad,) = torch.autograd.grad(form(images, sim, 8, 0.01, 0.2), sim)
            if rep >= 3:
                times[name] += time.perf_counter() - t0
            grads[name] = grad
    plain, ours = (times[n] / a.repeat * 1e3 for n in ("plain", "ours"))
    diff = float((grads["plain"] - grads["ours"]).abs().max())
    print(f"patch consistency, batch 16 x 64 patches x 4 x 256, {a.threads} thread(s): plain {plain:.2f} ms, "
          f"ours {ours:.2f} ms, ratio {plain / ours:.2f}x; largest gradient difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
