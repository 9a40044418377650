"""The ShapeWorld detector: finds shapes in any RGB image (rendered, degraded or generated).

Colour segmentation against the background → connected components per palette colour → the colour of a
component is the palette entry nearest to its median pixel, and its kind comes from occupancy features of its
bounding box (fill ratio and how full the top and bottom corners are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from unified_mllm.shapeworld.scene import BACKGROUND, COLORS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_NAMES = list(COLORS)
FOREGROUND_DISTANCE = 70.0
"""A pixel is foreground when its RGB distance to the background exceeds this."""


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    cx: float
    """Bounding-box centre x, fraction of the width."""
    cy: float
    """Bounding-box centre y, fraction of the height."""
    area: float
    """Pixel area as a fraction of the image."""
    box: tuple[float, float, float, float]


# Row-coverage profile of each kind at 25 %, 50 % and 75 % of its height (apex-up triangle).
_PROFILES = {
    "square": (1.0, 1.0, 1.0),
    "circle": (0.866, 1.0, 0.866),
    "diamond": (0.5, 1.0, 0.5),
    "triangle": (0.25, 0.5, 0.75),
}


MAX_BOX = 0.6
"""Shapes are at most 0.34 of the image wide; a blob whose box spans more than this is not one shape."""
MAX_ASPECT = 1.8
"""Every kind has a square box; a blob longer than this in one direction is not a shape."""
MAX_PROFILE_ERROR = 0.15
"""A blob whose row-coverage profile is further than this (squared distance) from every kind is not a shape."""
MIN_PURITY = 0.6
"""Share of a blob's pixels that must lie near its palette colour (noise and smears are many colours)."""
PURITY_DISTANCE = 90.0


def _profile_fit(mask: np.ndarray) -> tuple[str, float]:
    h = mask.shape[0]
    rows = mask.mean(axis=1)  # (h,) coverage of each row

    def band(frac: float) -> float:
        lo = int(np.floor(frac * h - 0.1 * h))
        hi = int(np.ceil(frac * h + 0.1 * h))
        return float(rows[max(0, lo):max(lo + 1, min(h, hi))].mean())

    profile = np.array([band(0.25), band(0.5), band(0.75)])
    errors = {k: float(((profile - np.array(v)) ** 2).sum()) for k, v in _PROFILES.items()}
    kind = min(errors, key=errors.get)
    return kind, errors[kind]


def _classify(mask: np.ndarray) -> str:
    """Kind of a shape from its tight binary mask (h, w): the nearest row-coverage profile.

    How wide a shape is at a quarter, half and three quarters of its height separates the four kinds by a wide
    margin, and blur, JPEG and noise move these widths far less than they move corners or fill ratios.
    """
    return _profile_fit(mask)[0]


def _detection(comp: np.ndarray, sl: tuple[slice, slice], arr: np.ndarray, dist: np.ndarray, H: int,
               W: int) -> Detection | None:
    pixels = arr[sl][comp]
    median = np.median(pixels, axis=0)
    k = int(np.argmin(((median - _PALETTE) ** 2).sum(-1)))
    color = _NAMES[k]
    if float((np.linalg.norm(pixels - _PALETTE[k], axis=-1) < PURITY_DISTANCE).mean()) < MIN_PURITY:
        return None  # a smear of many colours (noise, a failed generation), not a flat-coloured shape
    # the shape's outline at half its contrast against the background: stable under blur and JPEG
    pad = 2
    y0, y1 = max(0, sl[0].start - pad), min(H, sl[0].stop + pad)
    x0, x1 = max(0, sl[1].start - pad), min(W, sl[1].stop + pad)
    region = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    region[sl[0].start - y0: sl[0].stop - y0, sl[1].start - x0: sl[1].stop - x0] = comp
    region = ndimage.binary_dilation(region, iterations=pad)
    contrast = float(np.linalg.norm(median - np.array(BACKGROUND, dtype=np.float32)))
    half = region & (dist[y0:y1, x0:x1] > 0.5 * contrast)
    ys, xs = np.nonzero(half)
    if len(ys) == 0:
        return None
    ty0, ty1, tx0, tx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    mask = ndimage.binary_fill_holes(half[ty0:ty1, tx0:tx1])
    by0, by1, bx0, bx1 = y0 + ty0, y0 + ty1, x0 + tx0, x0 + tx1
    bh, bw = (by1 - by0) / H, (bx1 - bx0) / W
    if max(bh, bw) > MAX_BOX or max(bh, bw) > MAX_ASPECT * min(bh, bw):
        return None
    kind, error = _profile_fit(mask)
    if error > MAX_PROFILE_ERROR:
        return None
    return Detection(kind, color, (bx0 + bx1) / 2 / W, (by0 + by1) / 2 / H, float(comp.sum()) / (H * W),
                     (bx0 / W, by0 / H, bx1 / W, by1 / H))


def detect(image: Image.Image | np.ndarray, min_area_frac: float = 0.006) -> list[Detection]:
    """All shapes found in ``image``, largest first.

    Foreground blobs are found first (robust to colour bleeding at edges, as JPEG and blur cause); a blob whose
    pixels fall into two or more palette colours in substantial shares is split by colour (touching shapes).
    """
    return detect_scene(image, min_area_frac)[0]


def detect_scene(image: Image.Image | np.ndarray, min_area_frac: float = 0.006) -> tuple[list[Detection], int]:
    """:func:`detect`'s shapes and the number of foreground blobs of at least the minimum area, whether read as a
    shape or not (a generated image of noise or fragments has many blobs of which a few happen to pass as shapes)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    H, W = arr.shape[:2]
    dist = np.linalg.norm(arr - np.array(BACKGROUND, dtype=np.float32), axis=-1)  # (H, W)
    fg = dist > FOREGROUND_DISTANCE
    nearest = np.argmin(((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1), axis=-1)  # (H, W)
    min_area = max(4, int(min_area_frac * H * W))
    found: list[Detection] = []
    blobs = 0
    labels, _ = ndimage.label(fg)
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = ndimage.binary_fill_holes(labels[sl] == idx)
        area = int(comp.sum())
        if area < min_area:
            continue
        blobs += 1
        share = np.bincount(nearest[sl][comp], minlength=len(_NAMES)) / area
        major = [k for k in range(len(_NAMES)) if share[k] >= 0.25 and share[k] * area >= min_area]
        if len(major) <= 1:
            det = _detection(comp, sl, arr, dist, H, W)
            if det is not None:
                found.append(det)
            continue
        for k in major:  # touching shapes of different colours: split the blob by colour
            sub_labels, _ = ndimage.label(ndimage.binary_closing(comp & (nearest[sl] == k)))
            for j, sub in enumerate(ndimage.find_objects(sub_labels), start=1):
                part = sub_labels[sub] == j
                if part.sum() >= min_area:
                    full = (slice(sl[0].start + sub[0].start, sl[0].start + sub[0].stop),
                            slice(sl[1].start + sub[1].start, sl[1].start + sub[1].stop))
                    det = _detection(part, full, arr, dist, H, W)
                    if det is not None:
                        found.append(det)
    return sorted(found, key=lambda d: -d.area), blobs
