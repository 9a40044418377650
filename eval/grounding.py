"""Question grounding on ShapeWorld: does the model read the question's words against the image?

Accuracy per category can hide a model that answers from the image alone — "what colour is the circle?" answered
with the colour of any object scores well on one-object scenes. This check asks questions whose answer changes with
the words while the image stays the same, on held-in scenes of two or more objects:

- ``colour_of_shape``: "What color is the S?" for each uniquely shaped object — right only when the model looks up
  the named shape (``any_object_colour`` is how often it names the colour of some object in the scene: a model that
  ignores the shape word scores high there and about 1 / number of objects on the accuracy);
- ``presence_present``: "Is there a C S?" for a pair in the scene (answer yes);
- ``presence_swapped``: colour C and shape S are both in the scene, on different objects (answer no) — binding;
- ``presence_absent_colour``: a colour that is not in the scene with a shape that is (answer no).

    python -m eval.grounding --checkpoint runs/quickstart/mixed/export --data runs/quickstart/data/shapeworld
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from eval.common import EvalError, load_pipeline, read_jsonl, run_cli, write_json
from eval.shapeworld import answer_questions
from unified_mllm.shapeworld.grade import normalize_answer
from unified_mllm.shapeworld.scene import COLORS

PROBES = ("colour_of_shape", "presence_present", "presence_swapped", "presence_absent_colour")


def grounding_questions(data: str | Path, split: str = "heldin", max_scenes: int | None = 150) -> list[dict]:
    """The questions of the check for the first ``max_scenes`` scenes of the split with two or more objects."""
    data = Path(data)
    scenes = read_jsonl(data / f"scenes_test_{split}.jsonl", required=("id", "objects"))
    scenes = [s for s in scenes if len(s["objects"]) >= 2][:max_scenes]
    if not scenes:
        raise EvalError(f"{data}/scenes_test_{split}.jsonl: no scene with two or more objects")
    questions = []
    for n, scene in enumerate(scenes):
        image = data / "images" / f"test_{split}" / f"{scene['id'].rsplit('-', 1)[1]}.png"
        if not image.is_file():
            raise EvalError(f"{image}: image of scene {scene['id']} not found; regenerate the data")
        objs = scene["objects"]
        shapes, colours = Counter(o["shape"] for o in objs), sorted({o["color"] for o in objs})
        present = sorted({(o["color"], o["shape"]) for o in objs})
        absent = [c for c in COLORS if c not in colours]
        asked = [("colour_of_shape", f"What color is the {o['shape']}?", o["color"])
                 for o in objs if shapes[o["shape"]] == 1]
        asked += [("presence_present", f"Is there a {c} {s}?", "yes") for c, s in present]
        swapped = [(c, s) for c in colours for s in sorted(shapes) if (c, s) not in present][:2]
        asked += [("presence_swapped", f"Is there a {c} {s}?", "no") for c, s in swapped]
        if absent:  # a different absent colour from scene to scene
            asked.append(("presence_absent_colour", f"Is there a {absent[n % len(absent)]} {objs[0]['shape']}?", "no"))
        questions += [{"probe": probe, "question": q, "answer": a, "image_path": str(image), "scene": scene["id"],
                       "scene_colours": colours} for probe, q, a in asked]
    return questions


EXTRAS = {"colour_of_shape": "any_object_colour", "presence_present": "says_yes", "presence_swapped": "says_yes",
          "presence_absent_colour": "says_yes"}
"""What each probe reports beside its accuracy: how often the answer is a colour of the scene, or is yes."""


def score(questions: list[dict], predictions: list[str]) -> dict:
    """Accuracy per probe, and the rate of :data:`EXTRAS` (yes for presence, any scene colour for colour_of_shape)."""
    out: dict[str, dict] = {}
    for q, pred in zip(questions, predictions):
        words = normalize_answer(pred).split()
        first = words[0] if words else ""
        extra = EXTRAS[q["probe"]]
        r = out.setdefault(q["probe"], {"n": 0, "accuracy": 0, extra: 0})
        r["n"] += 1
        r["accuracy"] += first == q["answer"]
        r[extra] += first == "yes" if extra == "says_yes" else first in q["scene_colours"]
    for r in out.values():
        for k in r:
            if k != "n":
                r[k] = round(r[k] / r["n"], 4)
    return {p: out[p] for p in PROBES if p in out}


def run(checkpoint: str | Path, data: str | Path, split: str = "heldin", max_scenes: int | None = 150,
        out: str | Path | None = None, batch_size: int = 32, device: str = "auto", dtype: str = "auto",
        pipe=None) -> dict:
    questions = grounding_questions(data, split, max_scenes)
    pipe = pipe or load_pipeline(checkpoint, device, dtype)
    predictions = answer_questions(pipe, questions, batch_size, max_new_tokens=4)
    result = {"checkpoint": str(checkpoint), "split": split, "probes": score(questions, predictions),
              "records": [{**{k: q[k] for k in ("probe", "scene", "question", "answer")}, "prediction": p}
                          for q, p in zip(questions, predictions)]}
    if out:
        write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory of a trained model")
    p.add_argument("--data", required=True, help="ShapeWorld data directory")
    p.add_argument("--split", default="heldin", choices=("heldin", "heldout"))
    p.add_argument("--max-scenes", type=int, default=150, help="scenes of two or more objects to ask about")
    p.add_argument("--out", help="JSON file for the scores and every answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    result = run(a.checkpoint, a.data, a.split, a.max_scenes, a.out, a.batch_size, a.device, a.dtype)
    for probe, r in result["probes"].items():
        print(f"{probe:<24} n={r['n']:<4} accuracy {r['accuracy']:.2f}, {EXTRAS[probe]} {r[EXTRAS[probe]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
