"""Held-out compositions: never in training data, in both directions; present in the held-out test splits."""

from __future__ import annotations

from unified_mllm.shapeworld.scene import Scene, dominant_relation

HELDOUT_COLOR_SHAPE = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "diamond")})
"""Colour–shape pairs that no training image contains."""
HELDOUT_COUNT_SHAPE = frozenset({(3, "triangle"), (2, "diamond")})
"""No training image contains exactly this many of this shape."""
HELDOUT_RELATIONS = frozenset({("circle", "above", "square"), ("triangle", "left of", "diamond")})
"""No training image has a shape in this unambiguous relation to the other (nor the inverse statement)."""

_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation_is_heldout(shape_a: str, relation: str, shape_b: str) -> bool:
    return ((shape_a, relation, shape_b) in HELDOUT_RELATIONS
            or (shape_b, _INVERSE[relation], shape_a) in HELDOUT_RELATIONS)


def heldout_reasons(scene: Scene) -> list[str]:
    """The held-out compositions a scene contains (empty: the scene may be used for training)."""
    reasons = [f"{o.color} {o.shape}" for o in scene.objects if (o.color, o.shape) in HELDOUT_COLOR_SHAPE]
    for n, shape in HELDOUT_COUNT_SHAPE:
        if scene.count(shape) == n:
            reasons.append(f"{n} {shape}")
    objs = scene.objects
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i != j:
                rel = dominant_relation(a, b)
                if rel and relation_is_heldout(a.shape, rel, b.shape):
                    reasons.append(f"{a.shape} {rel} {b.shape}")
    return reasons


def is_heldout(scene: Scene) -> bool:
    return bool(heldout_reasons(scene))
