"""GenEval-style generation prompts for ShapeWorld, with scenes that satisfy (or violate) a prompt.

Specs use GenEval's metadata format (see ``grade.py``); held-out prompts name held-out compositions.
Single-object and two-object prompts have no compositional dimension to hold out, so they appear only
in the held-in set.
"""

from __future__ import annotations

import random

from unified_mllm.shapeworld.scene import COLORS, RELATIONS, SHAPES, Scene, place
from unified_mllm.shapeworld.splits import (
    HELDOUT_COLOR_SHAPE,
    HELDOUT_COUNT_SHAPE,
    relation_is_heldout,
)
from unified_mllm.shapeworld.text import NUMBER_WORDS, plural

COLOR_LIST = list(COLORS)


def _pair(rng: random.Random, heldout: bool) -> tuple[str, str]:
    if heldout:
        return rng.choice(sorted(HELDOUT_COLOR_SHAPE))
    while True:
        c, s = rng.choice(COLOR_LIST), rng.choice(SHAPES)
        if (c, s) not in HELDOUT_COLOR_SHAPE:
            return c, s


def make_spec(tag: str, rng: random.Random, heldout: bool = False) -> dict:
    """A random GenEval-style spec of category ``tag`` (held-out compositions when ``heldout``)."""
    if tag == "single_object":
        s = rng.choice(SHAPES)
        return {"tag": tag, "include": [{"class": s, "count": 1}], "prompt": f"a photo of a {s}"}
    if tag == "two_object":
        a, b = rng.sample(SHAPES, 2)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of a {a} and a {b}"}
    if tag == "counting":
        if heldout:
            n, s = rng.choice(sorted(HELDOUT_COUNT_SHAPE))
        else:
            while True:
                n, s = rng.randint(2, 4), rng.choice(SHAPES)
                if (n, s) not in HELDOUT_COUNT_SHAPE:
                    break
        return {"tag": tag, "include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {plural(s, n)}"}
    if tag == "colors":
        c, s = _pair(rng, heldout)
        return {"tag": tag, "include": [{"class": s, "count": 1, "color": c}], "prompt": f"a photo of a {c} {s}"}
    if tag == "position":
        while True:
            a, b = rng.sample(SHAPES, 2)
            rel = rng.choice(RELATIONS)
            if relation_is_heldout(a, rel, b) == heldout:
                break
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of a {a} {rel} a {b}"}
    if tag == "color_attr":
        while True:
            (c1, s1), (c2, s2) = _pair(rng, heldout), _pair(rng, False)
            if s1 != s2 and c1 != c2:
                break
        if rng.random() < 0.5:
            (c1, s1), (c2, s2) = (c2, s2), (c1, s1)
        return {"tag": tag, "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
                "prompt": f"a photo of a {c1} {s1} and a {c2} {s2}"}
    raise ValueError(f"unknown GenEval tag {tag!r}")


def scene_for_spec(spec: dict, rng: random.Random, resolution_objects: int = 4) -> Scene:
    """A scene that satisfies ``spec`` exactly (the ground truth a perfect generator would draw)."""
    objs: list[tuple[str, str]] = []
    relation = None
    inc = spec["include"]
    if spec["tag"] == "position":
        relation = inc[1]["position"][0]
        objs = [(inc[1]["class"], rng.choice(COLOR_LIST)), (inc[0]["class"], rng.choice(COLOR_LIST))]
    else:
        for req in inc:
            objs += [(req["class"], req.get("color") or rng.choice(COLOR_LIST)) for _ in range(req["count"])]
    for _ in range(100):
        scene = place(rng, objs, relation=relation)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not lay out a scene for {spec['prompt']!r}")


def violating_scene(spec: dict, rng: random.Random) -> Scene:
    """A scene close to ``spec`` that must fail it (one requirement broken): checks the grader's negatives."""
    inc = spec["include"]
    tag = spec["tag"]
    if tag == "position":
        rel = inc[1]["position"][0]
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        objs = [(inc[1]["class"], rng.choice(COLOR_LIST)), (inc[0]["class"], rng.choice(COLOR_LIST))]
        scene = place(rng, objs, relation=opposite)
    elif tag == "counting":
        n, s = inc[0]["count"], inc[0]["class"]
        m = n - 1 if (n == 4 or rng.random() < 0.5) else n + 1
        scene = place(rng, [(s, rng.choice(COLOR_LIST)) for _ in range(m)])
    elif tag in ("colors", "color_attr"):
        i = rng.randrange(len(inc))
        objs = []
        for j, req in enumerate(inc):
            color = req["color"] if j != i else rng.choice([c for c in COLOR_LIST if c != req["color"]])
            objs.append((req["class"], color))
        scene = place(rng, objs)
    else:  # single_object, two_object: replace one required shape by another not required
        required = {r["class"] for r in inc}
        i = rng.randrange(len(inc))
        objs = [(r["class"] if j != i else rng.choice([s for s in SHAPES if s not in required]), rng.choice(COLOR_LIST))
                for j, r in enumerate(inc)]
        scene = place(rng, objs)
    if scene is None:
        return violating_scene(spec, rng)
    return scene
