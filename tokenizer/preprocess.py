"""Evaluation preprocessing of the released WinTok: RGB, bicubic shortest-side resize, centre crop, [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def preprocess_one(image: Image.Image, size: int) -> torch.Tensor:
    img = image.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, S, S)
    return arr / 127.5 - 1.0


def preprocess(images: Image.Image | Sequence[Image.Image], size: int = 256) -> torch.Tensor:
    """PIL image(s) of any mode → float tensor (B, 3, size, size) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    return torch.stack([preprocess_one(im, size) for im in images])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
