"""Reconstruction evaluation of a WinTok checkpoint over an image folder (ImageNet-val / COCO-val2017 layouts or
any folder): PSNR, SSIM, codebook usage and perplexity, LPIPS-VGG and rFID (with their weights given by local path),
and the ShapeWorld judge's agreement; a JSON result and a PNG of originals above reconstructions.

    python -m tokenizer.eval --checkpoint DIR_OR_PTH --images DIR [--max-images N] [--out eval.json]
        [--grid recon.png] [--inception-torchscript pt_inception-2015-12-05.pt] [--shapeworld-judge]
        [--lpips-vgg16 vgg16.pth --lpips-linear vgg.pth]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer.checkpoint import WinTokLoadError
from tokenizer.data import list_images
from tokenizer.lpips import LPIPSError, lpips_from_paths
from tokenizer.model import WinTok
from tokenizer.preprocess import preprocess, to_pil


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of uint8-quantised images given in [-1, 1], (B, 3, H, W)."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def ssim_uint8(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5, per channel, averaged) on uint8-quantised images."""
    x = ((a.clamp(-1, 1) + 1) * 127.5).round()
    y = ((b.clamp(-1, 1) + 1) * 127.5).round()
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return ssim.flatten(1).mean(1)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (N, D)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def judge_agrees(original: Image.Image, reconstruction: Image.Image, tolerance: float = 0.06) -> bool:
    """The ShapeWorld judge reads the same objects (kind, colour, position within ``tolerance``) in both."""
    from unified_mllm.shapeworld.judge import detect

    a = sorted(detect(original), key=lambda d: (d.shape, d.color, d.cx))
    b = sorted(detect(reconstruction), key=lambda d: (d.shape, d.color, d.cx))
    return len(a) == len(b) and all(
        (x.shape, x.color) == (y.shape, y.color) and abs(x.cx - y.cx) <= tolerance and abs(x.cy - y.cy) <= tolerance
        for x, y in zip(a, b))


@torch.inference_mode()
def evaluate(model: WinTok, images: str | Path, max_images: int | None = None, batch_size: int = 32,
             grid_path: str | Path | None = None, inception: str | None = None, shapeworld_judge: bool = True,
             perceptual: torch.nn.Module | None = None) -> dict:
    files = list_images(images, max_images)
    c = model.config
    size = c.image_size
    counts = torch.zeros(c.num_codebooks, c.codebook_size)
    psnrs, ssims, lpips, agree, grid = [], [], [], [], []
    feats_real, feats_fake = [], []
    extractor = torch.jit.load(inception, map_location="cpu").eval() if inception else None
    for start in range(0, len(files), batch_size):
        batch = [Image.open(f).convert("RGB") for f in files[start:start + batch_size]]
        x = preprocess(batch, size)
        enc = model.encode(x)
        y = model.decode_codes(enc.pixel_codes)
        for i in range(c.num_codebooks):
            counts[i] += torch.bincount(enc.pixel_codes[:, i].flatten(), minlength=c.codebook_size).float()
        psnrs.append(psnr_uint8(x, y))
        ssims.append(ssim_uint8(x, y))
        if perceptual is not None:
            lpips.append(perceptual(x, y).float().cpu())
        originals, recons = to_pil(x), to_pil(y)
        if shapeworld_judge:
            agree += [judge_agrees(o, r) for o, r in zip(originals, recons)]
        if len(grid) < 16:
            grid += list(zip(originals, recons))[: 16 - len(grid)]
        if extractor is not None:
            def to_uint8(t):
                return ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

            feats_real.append(extractor(to_uint8(x)).flatten(1).numpy())
            feats_fake.append(extractor(to_uint8(y)).flatten(1).numpy())
    prob = counts / counts.sum(1, keepdim=True)
    entropy = -(prob * torch.log(prob.clamp_min(1e-12))).sum(1)
    result = {
        "num_images": len(files),
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": float((counts > 0).float().mean()),
        "codebook_perplexity": float(torch.exp(entropy).mean()),
        "codebook_size": c.codebook_size,
    }
    if perceptual is not None:
        result["lpips_vgg"] = float(torch.cat(lpips).mean())
    if shapeworld_judge:
        result["shapeworld_judge_agreement"] = float(np.mean(agree))
    if extractor is not None:
        result["rfid"] = frechet_distance(np.concatenate(feats_real), np.concatenate(feats_fake))
    if grid_path is not None and grid:
        w = size
        canvas = Image.new("RGB", (w * len(grid), 2 * w), "white")
        for i, (o, r) in enumerate(grid):
            canvas.paste(o, (i * w, 0))
            canvas.paste(r, (i * w, w))
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(grid_path)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="save_pretrained dir, released .pth or .safetensors")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--grid", default=None, help="write a PNG of originals (top) and reconstructions (bottom)")
    p.add_argument("--inception-torchscript", default=None,
                   help="TorchScript Inception feature extractor (e.g. pt_inception-2015-12-05) for rFID")
    p.add_argument("--shapeworld-judge", action="store_true", help="also report the ShapeWorld judge's agreement")
    p.add_argument("--lpips-vgg16", default=None, help="torchvision vgg16 state dict (local file) for LPIPS")
    p.add_argument("--lpips-linear", default=None, help="lpips linear weights (the lpips package's v0.1/vgg.pth)")
    a = p.parse_args(argv)
    try:
        model = WinTok.from_checkpoint(a.checkpoint).freeze()
        perceptual = lpips_from_paths(a.lpips_vgg16, a.lpips_linear)
        result = evaluate(model, a.images, a.max_images, a.batch_size, a.grid, a.inception_torchscript,
                          a.shapeworld_judge, perceptual)
    except (WinTokLoadError, LPIPSError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0 if all(not (isinstance(v, float) and math.isnan(v)) for v in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
