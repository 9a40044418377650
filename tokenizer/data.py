"""Image folders for tokenizer training and evaluation, with an exactly resumable, rank-sharded order."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from tokenizer.preprocess import preprocess_one

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
log = logging.getLogger(__name__)


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found (for ShapeWorld, generate it with "
                                f"`python -m unified_mllm.shapeworld --out DIR`)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images (.png/.jpg/.jpeg/.webp/.bmp) found")
    return files[:limit] if limit else files


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.9, 1.0)) -> Image.Image:
    w, h = img.size
    area = w * h * rng.uniform(*scale)
    side = min(int(round(area**0.5)), w, h)
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


class ImageStream:
    """Endless batches from an image list: a seeded permutation per epoch, rank r takes every world-th item.

    ``state_dict()`` is (epoch, position); restoring it continues with exactly the next batch. ``last_indices``
    holds the file indices of the batch just returned (for per-image caches such as teacher embeddings).
    ``cache=True`` (only without random crops) keeps each decoded image as uint8 after its first read.
    """

    def __init__(self, files: list[Path], size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 random_crop: bool = False, on_bad_sample: str = "skip", cache: bool = False):
        self.files, self.size, self.batch_size, self.seed = files, size, batch_size, seed
        self.rank, self.world_size, self.random_crop, self.on_bad_sample = rank, world_size, random_crop, on_bad_sample
        self.epoch, self.position = 0, 0
        self.skipped: dict[str, int] = {}
        self.cache: dict[int, torch.Tensor] | None = {} if cache and not random_crop else None
        self.last_indices: list[int] = []
        self._order_cache: list[int] = []
        self._order_epoch: int | None = None

    def _order(self) -> list[int]:
        """This epoch's file order for this rank, shuffled once per epoch (not once per image: with 50k files a
        reshuffle per image cost ~15 ms and was the training step's bottleneck)."""
        if self._order_epoch != self.epoch:
            idx = list(range(len(self.files)))
            random.Random(f"{self.seed}:{self.epoch}").shuffle(idx)
            self._order_cache, self._order_epoch = idx[self.rank::self.world_size], self.epoch
        return self._order_cache

    def _load(self, path: Path, rng: random.Random) -> torch.Tensor | None:
        try:
            with Image.open(path) as img:
                img.load()
                if self.random_crop:
                    img = random_resized_crop(img.convert("RGB"), self.size, rng)
                return preprocess_one(img, self.size)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            if self.on_bad_sample == "error":
                raise ValueError(f"{path}: unreadable image ({e}); remove it or set data.on_bad_sample: skip") from None
            self.skipped["unreadable_image"] = self.skipped.get("unreadable_image", 0) + 1
            log.warning("skipping unreadable image %s (%s)", path, e)
            return None

    def __iter__(self):
        return self

    def _get(self, i: int) -> torch.Tensor | None:
        if self.cache is not None and i in self.cache:
            return self.cache[i].float() / 127.5 - 1.0
        x = self._load(self.files[i], random.Random(f"{self.seed}:{self.epoch}:{i}"))
        if x is not None and self.cache is not None:
            self.cache[i] = ((x + 1.0) * 127.5).round().to(torch.uint8)  # exact: decoded pixels are uint8
        return x

    def __next__(self) -> torch.Tensor:
        batch: list[torch.Tensor] = []
        self.last_indices = []
        while len(batch) < self.batch_size:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            i = order[self.position]
            self.position += 1
            x = self._get(i)
            if x is not None:
                batch.append(x)
                self.last_indices.append(i)
        return torch.stack(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = dict(state.get("skipped", {}))

    def stats(self) -> dict[str, int]:
        return dict(self.skipped)
