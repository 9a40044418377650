"""Image degradations for checking the judge on imperfect images (noise, blur, colour jitter, JPEG)."""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter


def gaussian_noise(img: Image.Image, rng: random.Random, sigma: float = 18.0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def blur(img: Image.Image, rng: random.Random, radius: float = 1.0) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius * img.width / 64))


def color_jitter(img: Image.Image, rng: random.Random, strength: float = 25.0) -> Image.Image:
    """A random per-channel shift and a brightness scale, as off-colour generations have."""
    arr = np.asarray(img, dtype=np.float32)
    shift = np.array([rng.uniform(-strength, strength) for _ in range(3)], dtype=np.float32)
    scale = rng.uniform(0.85, 1.1)
    return Image.fromarray(np.clip(arr * scale + shift, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, rng: random.Random, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def all_at_once(img: Image.Image, rng: random.Random) -> Image.Image:
    return jpeg(gaussian_noise(color_jitter(blur(img, rng, 0.7), rng, 15.0), rng, 10.0), rng, 60)


DEGRADATIONS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "clean": lambda img, rng: img,
    "noise": gaussian_noise,
    "blur": blur,
    "color_jitter": color_jitter,
    "jpeg": jpeg,
    "combined": all_at_once,
}
