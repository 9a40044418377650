"""Helpers shared by the evaluation runners: loading a checkpoint, JSON lines, atomic image writes, grids."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw


class EvalError(Exception):
    """Bad input for an evaluation (missing file, malformed record, bad checkpoint): one line naming the fix."""


def load_pipeline(checkpoint: str | Path, device: str = "auto", dtype: str = "auto"):
    """The inference pipeline of an export directory, or an :class:`EvalError` saying what to pass instead."""
    from unified_mllm.inference import UnifiedPipeline

    path = Path(checkpoint)
    if not path.is_dir():
        raise EvalError(f"--checkpoint {checkpoint}: not a directory; pass the export directory of a trained stage "
                        "(it holds unified_config.json), e.g. runs/quickstart/mixed/export")
    try:
        return UnifiedPipeline.from_pretrained(path, device=device, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"--checkpoint {checkpoint}: cannot load the export ({type(e).__name__}: {e})") from None


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSON-lines file; a malformed line or a missing key is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object per line")
        missing = [k for k in required if k not in row]
        if missing:
            raise EvalError(f"{path}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no records")
    return rows


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def save_png(image: Image.Image, path: str | Path) -> None:
    """Save a PNG atomically, so an interrupted run never leaves a truncated image that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def natural_key(name: str) -> tuple:
    """Sort key that puts ``2`` before ``10`` (DPG prompt files are numbered)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def image_grid(images: list[Image.Image], cols: int, cell: int | None = None,
               labels: list[str] | None = None) -> Image.Image:
    """Images on a grid, ``cols`` per row, each resized to ``cell`` px, with an optional caption line under each."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    import textwrap

    cell = cell or images[0].size[0]
    width = max(4, cell // 6)  # characters per caption line (PIL's default bitmap font is ~6 px wide)
    label_h = 24 if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        grid.paste(img.convert("RGB").resize((cell, cell)), (x, y))
        if labels:
            text = "\n".join(textwrap.wrap(labels[i], width)[:2])
            draw.text((x + 2, y + cell), text, fill="black")
    return grid


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; an :class:`EvalError` becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def balanced_head(rows: list[dict], limit: int | None, key: str = "tag") -> list[dict]:
    """The first ``limit`` rows taken round-robin over ``key`` (file order within each value), so a limit smaller
    than the file keeps every category: the files list 50 prompts of one tag, then the next tag."""
    if not limit or limit >= len(rows):
        return rows
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    picked: list[dict] = []
    for i in range(max(len(g) for g in groups.values())):
        for g in groups.values():
            if i < len(g) and len(picked) < limit:
                picked.append(g[i])
    return picked
