"""How often the ShapeWorld judge is right, per category, on ground-truth renders — clean and degraded.

    python scripts/bench/shapeworld_judge.py --num-per-category 2000 [--resolution 64] [--json OUT]
    python scripts/bench/shapeworld_judge.py --roundtrip-checkpoint runs/quickstart/wintok   # + tokenizer round trip

Generation (GenEval's six categories): half the images satisfy a prompt (the grader must accept them), half
break one requirement (it must reject them). Understanding: the answer recomputed from detections must equal
the ground-truth answer. Target: >= 0.99 in every cell.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from unified_mllm.shapeworld.dataset import sample_scene  # noqa: E402
from unified_mllm.shapeworld.degrade import DEGRADATIONS  # noqa: E402
from unified_mllm.shapeworld.grade import GENEVAL_TAGS, grade_generation  # noqa: E402
from unified_mllm.shapeworld.judge import detect  # noqa: E402
from unified_mllm.shapeworld.prompts import make_spec, scene_for_spec, violating_scene  # noqa: E402
from unified_mllm.shapeworld.render import render  # noqa: E402
from unified_mllm.shapeworld.text import UND_CATEGORIES, answer_from_detections, question  # noqa: E402

_ROUNDTRIP = None


def _load_roundtrip(path: str | None):
    global _ROUNDTRIP
    if path is None or _ROUNDTRIP is not None:
        return
    import torch

    from tokenizer import WinTok, preprocess

    model = WinTok.from_checkpoint(path).freeze()

    def roundtrip(img, rng):
        with torch.inference_mode():
            x = preprocess([img], model.config.image_size)
            y = model.decode_codes(model.encode(x).pixel_codes)[0]
        arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        from PIL import Image

        return Image.fromarray(arr).resize(img.size, Image.BICUBIC)

    _ROUNDTRIP = roundtrip


def _job(args: tuple[str, str, str, int, int, int, str | None]) -> tuple[str, str, str, int, int]:
    kind, category, degradation, num, resolution, seed, ckpt = args
    rng = random.Random(f"{seed}:{kind}:{category}:{degradation}")
    _load_roundtrip(ckpt)
    fn = _ROUNDTRIP if degradation == "tokenizer_roundtrip" else DEGRADATIONS[degradation]
    right = 0
    for i in range(num):
        if kind == "generation":
            spec = make_spec(category, rng, heldout=rng.random() < 0.3 and category not in ("single_object", "two_object"))
            positive = i % 2 == 0
            scene = scene_for_spec(spec, rng) if positive else violating_scene(spec, rng)
            ok, _ = grade_generation(fn(render(scene, resolution), rng), spec)
            right += ok == positive
        else:
            scene = sample_scene(rng, heldout=rng.random() < 0.3)
            _, answer, spec = question(scene, rng, category)
            right += answer_from_detections(spec, detect(fn(render(scene, resolution), rng))) == answer
    return kind, category, degradation, right, num


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-per-category", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--roundtrip-checkpoint", default=None, help="a WinTok checkpoint: add a tokenizer round trip")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    a = p.parse_args()
    degradations = list(DEGRADATIONS)
    if a.roundtrip_checkpoint:
        degradations.append("tokenizer_roundtrip")
    jobs = [("generation", c, d, a.num_per_category, a.resolution, a.seed, a.roundtrip_checkpoint)
            for c in GENEVAL_TAGS for d in degradations]
    jobs += [("understanding", c, d, a.num_per_category, a.resolution, a.seed, a.roundtrip_checkpoint)
             for c in UND_CATEGORIES for d in degradations]
    with ProcessPoolExecutor(a.workers) as pool:
        results = list(pool.map(_job, jobs))
    table: dict = {}
    for kind, cat, deg, right, num in results:
        table.setdefault(f"{kind}/{cat}", {})[deg] = right / num
    width = max(len(k) for k in table)
    print(f"judge accuracy, {a.num_per_category} images per cell, {a.resolution} px")
    print(" " * width + "  " + "  ".join(f"{d[:12]:>12}" for d in degradations))
    for row, cells in table.items():
        print(f"{row:<{width}}  " + "  ".join(f"{cells[d]:>12.4f}" for d in degradations))
    worst = min(v for cells in table.values() for v in cells.values())
    print(f"worst cell: {worst:.4f} (target >= 0.99)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"resolution": a.resolution, "num_per_category": a.num_per_category,
                                            "table": table, "worst": worst}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
