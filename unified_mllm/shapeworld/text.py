"""Text for ShapeWorld scenes: captions (several phrasings) and question/answer pairs by category.

Every question carries a machine-readable ``spec`` so an answer can be recomputed from detections
(``answer_from_detections``) — that is how the judge is checked on understanding categories.
"""

from __future__ import annotations

import random
from collections import Counter

from unified_mllm.shapeworld.judge import Detection
from unified_mllm.shapeworld.scene import (
    COLOR_WEIGHTS,
    COLORS,
    RELATIONS,
    SHAPE_WEIGHTS,
    SHAPES,
    Scene,
    ShapeObject,
    dominant_relation,
)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PREFIXES = ("", "a photo of ", "an image of ", "a picture showing ")
UND_CATEGORIES = ("presence", "counting", "color", "shape", "position", "multiple_choice")
POPE_STRATEGIES = ("random", "popular", "adversarial")
QUESTION_SLACK = 0.04
"""Relations asked about are clearer than the minimum, so a few pixels of detector error cannot flip them."""


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def noun_phrase(n: int, shape: str, color: str | None) -> str:
    det = ("a" if n == 1 else NUMBER_WORDS[n])
    return f"{det} {color + ' ' if color else ''}{plural(shape, n)}"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption: grouped objects ("two red circles and a blue square"), or a relation for two objects."""
    prefix = rng.choice(PREFIXES)
    objs = scene.objects
    if len(objs) == 2 and rng.random() < 0.5:
        a, b = objs
        rel = dominant_relation(a, b, slack=QUESTION_SLACK)
        if rel:
            return f"{prefix}a {a.color} {a.shape} {rel} a {b.color} {b.shape}"
    with_color = rng.random() < 0.85
    groups = Counter((o.color if with_color else None, o.shape) for o in objs)
    parts = [noun_phrase(n, shape, color) for (color, shape), n in sorted(groups.items(), key=lambda kv: -kv[1])]
    return prefix + join_and(parts)


# ---------------------------------------------------------------------------------------- questions
def _presence(scene: Scene, rng: random.Random) -> tuple[str, str, dict]:
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if rng.random() < 0.5 or not absent:
        color, shape = rng.choice(sorted(present))
        strategy = "positive"
    else:
        strategy = rng.choice(POPE_STRATEGIES)
        if strategy == "popular":
            color, shape = max(absent, key=lambda cs: COLOR_WEIGHTS[cs[0]] * SHAPE_WEIGHTS[cs[1]])
        elif strategy == "adversarial":
            near = [cs for cs in absent if any(cs[0] == p[0] or cs[1] == p[1] for p in present)]
            color, shape = rng.choice(near or absent)
        else:
            color, shape = rng.choice(absent)
    answer = "yes" if (color, shape) in present else "no"
    q = rng.choice([f"Is there a {color} {shape} in the image?", f"Is there a {color} {shape}?"])
    return q, answer, {"category": "presence", "color": color, "shape": shape, "sampling": strategy}


def _counting(scene: Scene, rng: random.Random) -> tuple[str, str, dict]:
    shapes = [o.shape for o in scene.objects]
    shape = rng.choice(shapes) if rng.random() < 0.85 else rng.choice(SHAPES)
    q = rng.choice([f"How many {plural(shape, 2)} are there?", f"How many {plural(shape, 2)} are in the image?"])
    return q, str(shapes.count(shape)), {"category": "counting", "shape": shape}


def _color(scene: Scene, rng: random.Random) -> tuple[str, str, dict] | None:
    counts = Counter(o.shape for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.shape] == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"What color is the {o.shape}?", o.color, {"category": "color", "shape": o.shape}


def _shape(scene: Scene, rng: random.Random) -> tuple[str, str, dict] | None:
    counts = Counter(o.color for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.color] == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"What shape is the {o.color} object?", o.shape, {"category": "shape", "color": o.color}


def _position(scene: Scene, rng: random.Random) -> tuple[str, str, dict] | None:
    counts = Counter((o.color, o.shape) for o in scene.objects)
    pairs = [(a, b, dominant_relation(a, b, slack=QUESTION_SLACK)) for a in scene.objects for b in scene.objects
             if a is not b and counts[(a.color, a.shape)] == 1 and counts[(b.color, b.shape)] == 1]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    spec = {"category": "position", "a": [a.color, a.shape], "b": [b.color, b.shape]}
    if rng.random() < 0.5:
        asked = rel if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != rel])
        q = f"Is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?"
        return q, "yes" if asked == rel else "no", {**spec, "relation": asked}
    q = f"Where is the {a.color} {a.shape} relative to the {b.color} {b.shape}? Answer left, right, above or below."
    return q, rel.split()[0], spec


def _multiple_choice(scene: Scene, rng: random.Random) -> tuple[str, str, dict] | None:
    base = rng.choice([_counting, _color, _shape])(scene, rng)
    if base is None:
        return None
    q, answer, spec = base
    pool = {"counting": ["0", "1", "2", "3", "4"], "color": list(COLORS), "shape": list(SHAPES)}[spec["category"]]
    options = [answer] + rng.sample([p for p in pool if p != answer], 3)
    rng.shuffle(options)
    choices = dict(zip("ABCD", options))
    letter = "ABCD"[options.index(answer)]
    body = "\n".join(f"{k}. {v}" for k, v in choices.items())
    question = f"{q}\n{body}\nAnswer with the option's letter from the given choices directly."
    return question, letter, {**spec, "category": "multiple_choice", "base": spec["category"], "choices": choices}


GENERATORS = {"presence": _presence, "counting": _counting, "color": _color, "shape": _shape,
              "position": _position, "multiple_choice": _multiple_choice}


def question(scene: Scene, rng: random.Random, category: str | None = None) -> tuple[str, str, dict]:
    """One (question, answer, spec); ``category`` None picks one that applies to the scene."""
    cats = [category] if category else list(UND_CATEGORIES)
    for _ in range(20):
        got = GENERATORS[rng.choice(cats)](scene, rng)
        if got is not None:
            return got
    return _counting(scene, rng)


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short answers, which lmms-eval's POPE, TextVQA and GQA tasks append to each question."""


def conversation(scene: Scene, rng: random.Random, max_turns: int = 3) -> list[dict]:
    """A LLaVA-style conversation of 1–max_turns different questions; the image is placed in the first turn. Half of
    the open questions carry :data:`SHORT_ANSWER`, as in LLaVA-1.5's VQA data, so a model trained on them answers the
    benchmarks' prompt format the same way (without it, the tiny model read the trailing instruction as the
    multiple-choice one and answered "A")."""
    turns = rng.randint(1, max_turns)
    conv: list[dict] = []
    asked: set[str] = set()
    for i in range(turns):
        for _ in range(10):  # a question asked again in the same conversation is answered by copying: skip it
            q, a, spec = question(scene, rng)
            if q not in asked:
                break
        else:
            break
        asked.add(q)
        if spec.get("category") != "multiple_choice" and rng.random() < 0.5:
            q += SHORT_ANSWER
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return conv


# ----------------------------------------------------------------------------- answers from detections
def answer_from_detections(spec: dict, dets: list[Detection]) -> str:
    """What a perfect reader of ``dets`` answers to the question described by ``spec``."""
    cat = spec["category"]
    if cat == "multiple_choice":
        inner = answer_from_detections({**spec, "category": spec["base"]}, dets)
        inv = {v: k for k, v in spec["choices"].items()}
        return inv.get(inner, "?")
    if cat == "presence":
        return "yes" if any(d.color == spec["color"] and d.shape == spec["shape"] for d in dets) else "no"
    if cat == "counting":
        return str(sum(d.shape == spec["shape"] for d in dets))
    if cat == "color":
        found = [d for d in dets if d.shape == spec["shape"]]
        return found[0].color if len(found) == 1 else "?"
    if cat == "shape":
        found = [d for d in dets if d.color == spec["color"]]
        return found[0].shape if len(found) == 1 else "?"
    if cat == "position":
        a = [d for d in dets if [d.color, d.shape] == spec["a"]]
        b = [d for d in dets if [d.color, d.shape] == spec["b"]]
        if len(a) != 1 or len(b) != 1:
            return "?"
        sa = ShapeObject(a[0].shape, a[0].color, a[0].cx, a[0].cy, 0.0)
        sb = ShapeObject(b[0].shape, b[0].color, b[0].cx, b[0].cy, 0.0)
        rel = dominant_relation(sa, sb)
        if "relation" in spec:
            return "yes" if rel == spec["relation"] else "no"
        return rel.split()[0] if rel else "?"
    raise ValueError(f"unknown question category {cat!r}")
