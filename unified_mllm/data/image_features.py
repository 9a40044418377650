"""WinTok features of images: read from the pretokenize cache, or computed online (cached in memory)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from unified_mllm.data.samples import BadSample

log = logging.getLogger(__name__)


def _unwrap(ref):
    """A ``datasets`` Image cell ({bytes, path}) → its bytes or path; anything else unchanged."""
    return (ref.get("bytes") or ref.get("path")) if isinstance(ref, dict) else ref


def _sha1(data: bytes) -> str:
    return "sha1:" + hashlib.sha1(data).hexdigest()


def image_key(ref) -> str:
    """The pretokenize-cache key of an image: its absolute path (symlinks kept), or ``sha1:<digest>`` of encoded
    bytes (the same in every process, unlike ``hash``)."""
    ref = _unwrap(ref)
    if isinstance(ref, (bytes, bytearray)):
        return _sha1(ref)
    return os.path.abspath(ref)  # a relative SHAPEWORLD_DIR/DATA_ROOT finds what an absolute one cached, and back


def _read(ref) -> bytes:
    ref = _unwrap(ref)
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_image", f"{ref}: image file not found") from None
    except OSError as e:
        raise BadSample("corrupt_image", f"{ref}: unreadable image ({e})") from None


def _decode(data: bytes, ref) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise BadSample("corrupt_image", f"{_short(ref)}: unreadable image ({e})") from None


def open_image(ref) -> Image.Image:
    return _decode(_read(ref), ref)


def read_image(ref) -> tuple[Image.Image, str]:
    """The image and the ``sha1:`` digest of its encoded bytes, from one read of its file."""
    data = _read(ref)
    return _decode(data, ref), _sha1(data)


def content_digest(ref) -> str | None:
    """``sha1:<digest>`` of an image's encoded bytes, or None when they cannot be read. The pretokenize cache stores
    it beside each key, so a dataset moved or copied elsewhere still finds its rows by content (and a changed file
    does not)."""
    try:
        return _sha1(_read(ref))
    except BadSample:
        return None


class ImageFeatures:
    """``get(ref) -> (semantic (N, D) float, pixel_codes (C, P) long)``.

    The pretokenize cache is read lazily: only its ``key`` (and ``digest``) columns are indexed at start, a row is read
    from the memory-mapped Arrow table when first asked for. An image whose path is not in the cache is looked up by
    the digest of its bytes, so a run directory or dataset moved since pretokenizing still reads its cache. Online
    results are kept in memory."""

    def __init__(self, wintok, cache_dir: str | Path | None = None):
        self.wintok = wintok
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache = None
        self.rows: dict[str, int] = {}
        self.digests: dict[str, int] = {}
        self.unmatched: set[str] = set()  # paths whose bytes are not in the cache either: read once, not each epoch
        if cache_dir is not None and Path(cache_dir).is_dir():
            self._load_cache(Path(cache_dir))

    def _load_cache(self, cache_dir: Path) -> None:
        import datasets

        self.cache = datasets.load_from_disk(str(cache_dir)).with_format("numpy", columns=["semantic", "pixel_codes"])
        self.rows = {key: i for i, key in enumerate(self.cache.data.column("key").to_pylist())}
        if "digest" in self.cache.column_names:  # older caches have none: they are read by path only
            self.digests = {d: i for i, d in enumerate(self.cache.data.column("digest").to_pylist()) if d}
        log.info("indexed %d pretokenized images in %s", len(self.rows), cache_dir)

    def get(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        key = image_key(ref)
        if key in self.memory:
            return self.memory[key]
        i = self.rows.get(key)
        if i is None and self.digests and key not in self.unmatched:
            # a path not in the cache (a key of bytes is already their digest): moved or copied since pretokenizing?
            i = self.digests.get(content_digest(ref))
            if i is None:
                self.unmatched.add(key)
            else:
                self.rows[key] = i
        if i is not None:
            row = self.cache[i]
            return torch.from_numpy(row["semantic"]).float(), torch.from_numpy(row["pixel_codes"]).long()
        if self.wintok is None:
            raise BadSample("not_pretokenized", f"{_short(ref)}: not in the pretokenize cache ({len(self.rows)} images "
                                                f"indexed) and online tokenization is off; pretokenize this recipe "
                                                f"(`python -m unified_mllm.data.pretokenize`), or set "
                                                f"online_tokenization: true")
        from tokenizer import preprocess

        device = next(self.wintok.parameters()).device
        x = preprocess(open_image(ref), self.wintok.config.image_size).to(device)
        with torch.inference_mode():
            enc = self.wintok.encode(x)
        self.memory[key] = (enc.semantic_tokens[0].cpu().clone(), enc.pixel_codes[0].cpu().clone())
        return self.memory[key]


def _short(ref) -> str:
    ref = _unwrap(ref)
    return image_key(ref) if isinstance(ref, (bytes, bytearray)) else str(ref)
