"""WinTok features of images: read from the pretokenize cache, or computed online (cached in memory)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from unified_mllm.data.samples import BadSample

log = logging.getLogger(__name__)


def image_key(ref) -> str:
    return str(ref) if not isinstance(ref, (bytes, dict)) else f"bytes:{hash(bytes(ref['bytes']) if isinstance(ref, dict) else ref)}"


def open_image(ref) -> Image.Image:
    try:
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        img = Image.open(io.BytesIO(ref)) if isinstance(ref, bytes) else Image.open(ref)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise BadSample("missing_image", f"{ref}: image file not found") from None
    except (OSError, UnidentifiedImageError) as e:
        raise BadSample("corrupt_image", f"{ref}: unreadable image ({e})") from None


class ImageFeatures:
    """``get(ref) -> (semantic (N, D) float, pixel_codes (C, P) long)``."""

    def __init__(self, wintok, cache_dir: str | Path | None = None):
        self.wintok = wintok
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cache_dir is not None and Path(cache_dir).is_dir():
            self._load_cache(Path(cache_dir))

    def _load_cache(self, cache_dir: Path) -> None:
        import datasets

        ds = datasets.load_from_disk(str(cache_dir)).with_format("torch")
        for row in ds:
            self.memory[row["key"]] = (row["semantic"].float(), row["pixel_codes"].long())
        log.info("loaded %d pretokenized images from %s", len(self.memory), cache_dir)

    def get(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        key = image_key(ref)
        if key not in self.memory:
            if self.wintok is None:
                raise BadSample("not_pretokenized", f"{ref}: not in the pretokenize cache and online tokenization is off")
            from tokenizer import preprocess

            x = preprocess(open_image(ref), self.wintok.config.image_size)
            with torch.inference_mode():
                enc = self.wintok.encode(x)
            self.memory[key] = (enc.semantic_tokens[0].clone(), enc.pixel_codes[0].clone())
        return self.memory[key]
