"""Deterministic PIL renderer: flat-coloured shapes on a plain background, no anti-aliasing."""

from __future__ import annotations

from PIL import Image, ImageDraw

from unified_mllm.shapeworld.scene import BACKGROUND, COLORS, Scene, ShapeObject


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, res: int) -> None:
    x0, y0, x1, y1 = (v * res for v in obj.box)
    x1, y1 = x1 - 1, y1 - 1
    fill = COLORS[obj.color]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Render ``scene`` to an RGB image of ``resolution``² pixels."""
    img = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, resolution)
    return img
