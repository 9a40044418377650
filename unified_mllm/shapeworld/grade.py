"""Graders on top of the detector: GenEval-style generation grading and VQA-style answer grading.

A generation spec follows GenEval's ``evaluation_metadata.jsonl``: ``{"tag", "prompt", "include": [{"class",
"count", "color"?, "position": [relation, index]?}], "exclude": [{"class", "count"}]}``. The six tags are
GenEval's: single_object, two_object, counting, colors, position, color_attr; overall = mean over tags.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from PIL import Image

from unified_mllm.shapeworld.judge import detect_scene
from unified_mllm.shapeworld.scene import MAX_OBJECTS, holds

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def grade_generation(image: Image.Image | np.ndarray, spec: dict) -> tuple[bool, str]:
    """Whether ``image`` satisfies ``spec``, with the reason when it does not. It takes the image, not detections:
    the scene check counts the foreground blobs that no detection stands for."""
    dets, blobs = detect_scene(image)
    if len(dets) > MAX_OBJECTS:  # texture or noise read as many shapes would pass every "at least N" clause
        return False, f"{len(dets)} objects detected; a ShapeWorld scene holds at most {MAX_OBJECTS}"
    if blobs > MAX_OBJECTS:  # noise or fragments: a few of many blobs pass as shapes, as a detector would not
        return False, (f"{blobs} foreground blobs ({len(dets)} read as shapes); a ShapeWorld scene holds at most "
                       f"{MAX_OBJECTS}")
    for req in spec.get("include", []):
        matches = [d for d in dets if d.shape == req["class"] and ("color" not in req or d.color == req["color"])]
        what = f"{req.get('color', '') + ' ' if 'color' in req else ''}{req['class']}"
        if len(matches) < req["count"]:
            return False, f"expected {req['count']} {what}, found {len(matches)}"
        if "position" in req:
            relation, index = req["position"]
            target = spec["include"][index]
            anchors = [d for d in dets if d.shape == target["class"]
                       and ("color" not in target or d.color == target["color"])]
            if not any(holds((m.cx, m.cy), relation, (a.cx, a.cy)) for m in matches for a in anchors if a is not m):
                return False, f"no {what} {relation} a {target['class']}"
    for req in spec.get("exclude", []):
        n = sum(1 for d in dets if d.shape == req["class"])
        if n >= req["count"]:
            return False, f"expected fewer than {req['count']} {req['class']}, found {n}"
    return True, "ok"


def summarise(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """(tag, correct) pairs → per-tag accuracy and ``overall`` = mean over the tags present (GenEval)."""
    buckets: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in results:
        buckets[tag].append(bool(ok))
    scores = {tag: sum(v) / len(v) for tag, v in buckets.items()}
    if scores:
        scores["overall"] = sum(scores.values()) / len(scores)
    return scores


# ------------------------------------------------------------------------------------------- VQA
_NUMBERS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA-accuracy-style normalisation: lower case, no punctuation, no articles, number words → digits."""
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter of a multiple-choice answer ("B", "B.", "(B) two", "The answer is B")."""
    m = re.match(rf"^\s*\(?([{letters}])(?:[\).:,\s]|$)", text.strip())
    if m:
        return m.group(1)
    m = re.search(rf"\b(?:answer|option)\s*(?:is|:)?\s*\(?([{letters}])\b", text, re.IGNORECASE)
    return m.group(1).upper() if m else None


def grade_answer(prediction: str, answers: str | list[str], choices: dict[str, str] | None = None) -> bool:
    """True when the prediction matches a reference answer after normalisation.

    Yes/no questions compare the first word; multiple choice compares the option letter (or the option text).
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if choices:
        letter = extract_choice(prediction, "".join(choices))
        if letter is None:
            inverse = {normalize_answer(v): k for k, v in choices.items()}
            letter = inverse.get(normalize_answer(prediction))
        return letter is not None and letter in refs
    pred = normalize_answer(prediction)
    norm_refs = [normalize_answer(r) for r in refs]
    if norm_refs and norm_refs[0] in ("yes", "no"):
        return pred.split()[:1] == [norm_refs[0]]
    return pred in norm_refs
