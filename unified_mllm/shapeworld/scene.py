"""The vocabulary of ShapeWorld and a seeded scene sampler.

Coordinates are fractions of the image side (resolution independent): ``cx, cy`` is the centre of an
object's bounding box and ``size`` its side, so a scene renders the same at 32 or 64 px.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated colours far apart in RGB (min pairwise distance ≈ 160) on a dark background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 55),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 50, 210),
    "cyan": (40, 215, 220),
}
BACKGROUND = (24, 24, 24)
RELATIONS = ("left of", "right of", "above", "below")
# The prior popularity of objects (the sampler's weights); POPE "popular" negatives use it.
SHAPE_WEIGHTS = {"circle": 0.3, "square": 0.3, "triangle": 0.2, "diamond": 0.2}
COLOR_WEIGHTS = {"red": 0.22, "blue": 0.22, "green": 0.16, "yellow": 0.14, "purple": 0.13, "cyan": 0.13}
MAX_OBJECTS = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cx: float
    """Centre x as a fraction of the width."""
    cy: float
    """Centre y as a fraction of the height."""
    size: float
    """Side of the bounding box as a fraction of the image side."""

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([ShapeObject(**o) for o in d["objects"]])

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color))


# --------------------------------------------------------------------------------------- relations
REL_MARGIN = 0.12
"""Centres must differ by this fraction of the image side along the relation's axis."""


def holds(a: ShapeObject | tuple[float, float], relation: str, b: ShapeObject | tuple[float, float]) -> bool:
    """GenEval-style, non-exclusive: ``a`` is <relation> ``b`` when its centre is past b's by the margin."""
    ax, ay = (a.cx, a.cy) if isinstance(a, ShapeObject) else a
    bx, by = (b.cx, b.cy) if isinstance(b, ShapeObject) else b
    if relation == "left of":
        return bx - ax > REL_MARGIN
    if relation == "right of":
        return ax - bx > REL_MARGIN
    if relation == "above":
        return by - ay > REL_MARGIN
    if relation == "below":
        return ay - by > REL_MARGIN
    raise ValueError(f"unknown relation {relation!r} (valid: {', '.join(RELATIONS)})")


def dominant_relation(a: ShapeObject, b: ShapeObject, slack: float = 0.0) -> str | None:
    """The one relation of a to b that is unambiguous (clear on one axis, small on the other), else None.

    ``slack`` > 0 asks for a clearer case; text generation uses it so that a detector's few-pixel error on the
    object centres can never flip the answer.
    """
    dx, dy = b.cx - a.cx, b.cy - a.cy
    ratio = 0.5 - slack
    if abs(dx) > REL_MARGIN + 0.04 + slack and abs(dy) < abs(dx) * ratio:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > REL_MARGIN + 0.04 + slack and abs(dx) < abs(dy) * ratio:
        return "above" if dy > 0 else "below"
    return None


# ----------------------------------------------------------------------------------------- sampling
MIN_SIZE, MAX_SIZE = 0.24, 0.34
GAP = 0.05


def _fits(obj: ShapeObject, placed: list[ShapeObject]) -> bool:
    x0, y0, x1, y1 = obj.box
    if x0 < 0.03 or y0 < 0.03 or x1 > 0.97 or y1 > 0.97:
        return False
    for o in placed:
        a0, b0, a1, b1 = o.box
        if not (x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0):
            return False
    return True


def place(rng: random.Random, specs: list[tuple[str, str]], relation: str | None = None,
          max_tries: int = 400) -> Scene | None:
    """Place objects (shape, colour) without overlap; with ``relation``, object 0 is <relation> object 1
    unambiguously. Smaller sizes are used for more objects. Returns None if no layout was found."""
    n = len(specs)
    hi = MAX_SIZE if n <= 2 else 0.28 if n == 3 else 0.26
    for _ in range(max_tries):
        placed: list[ShapeObject] = []
        for shape, color in specs:
            for _ in range(60):
                size = rng.uniform(MIN_SIZE, hi)
                h = size / 2
                obj = ShapeObject(shape, color, rng.uniform(0.03 + h, 0.97 - h), rng.uniform(0.03 + h, 0.97 - h), size)
                if _fits(obj, placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) != n:
            continue
        if relation is not None and dominant_relation(placed[0], placed[1]) != relation:
            continue
        if relation is None and n == 2 and dominant_relation(placed[0], placed[1]) is None:
            # keep two-object scenes describable by a relation most of the time
            if rng.random() < 0.7:
                continue
        return Scene(placed)
    return None


def random_specs(rng: random.Random, num_objects: int) -> list[tuple[str, str]]:
    shapes = rng.choices(list(SHAPE_WEIGHTS), weights=list(SHAPE_WEIGHTS.values()), k=num_objects)
    colors = rng.choices(list(COLOR_WEIGHTS), weights=list(COLOR_WEIGHTS.values()), k=num_objects)
    return list(zip(shapes, colors))
