"""Write a ShapeWorld dataset directory in the formats real data uses, and load it as a `datasets` dataset.

Layout of ``OUT/``::

    images/{train,test_heldin,test_heldout}/NNNNNNN.png
    llava_train.json            LLaVA conversations [{"id", "image", "conversations": [{"from", "value"}]}]
    t2i_train.jsonl             text-to-image pairs {"id", "caption", "image"}
    vqa_heldin.jsonl            understanding test {"id", "image", "question", "answer", "category", "spec"}
    vqa_heldout.jsonl           the same on scenes with held-out compositions
    geneval_heldin.jsonl        GenEval-format generation prompts (tag, include, exclude, prompt)
    geneval_heldout.jsonl       prompts naming held-out compositions
    scenes_{split}.jsonl        the ground-truth scene of every image
    manifest.json               counts, seed, resolution, vocabulary, held-out compositions

Image paths in the records are relative to ``OUT``. Sample ``i`` of a split depends only on (seed, split, i),
so any number of worker processes writes the same dataset.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from unified_mllm.shapeworld import splits
from unified_mllm.shapeworld.grade import GENEVAL_TAGS
from unified_mllm.shapeworld.prompts import make_spec
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.scene import COLORS, RELATIONS, SHAPES, Scene, place, random_specs
from unified_mllm.shapeworld.text import UND_CATEGORIES, caption, conversation, question

NUM_OBJECTS_WEIGHTS = (0.3, 0.35, 0.2, 0.15)  # 1, 2, 3, 4 objects
SPLIT_SALT = {"train": 0, "test_heldin": 1, "test_heldout": 2}
COMPOSITIONAL_TAGS = ("counting", "colors", "position", "color_attr")


def sample_scene(rng: random.Random, heldout: bool) -> Scene:
    """A random scene: free of held-out compositions, or (heldout=True) containing at least one."""
    while True:
        n = rng.choices((1, 2, 3, 4), weights=NUM_OBJECTS_WEIGHTS)[0]
        if heldout and rng.random() < 0.6:  # bias towards a held-out pair/count/relation to make them common
            kind = rng.choice(["pair", "count", "relation"])
            if kind == "pair":
                color, shape = rng.choice(sorted(splits.HELDOUT_COLOR_SHAPE))
                specs = [(shape, color)] + random_specs(rng, max(0, n - 1))
                scene = place(rng, specs)
            elif kind == "count":
                k, shape = rng.choice(sorted(splits.HELDOUT_COUNT_SHAPE))
                specs = [(shape, rng.choice(list(COLORS))) for _ in range(k)]
                scene = place(rng, specs)
            else:
                a, rel, b = rng.choice(sorted(splits.HELDOUT_RELATIONS))
                scene = place(rng, [(a, rng.choice(list(COLORS))), (b, rng.choice(list(COLORS)))], relation=rel)
        else:
            scene = place(rng, random_specs(rng, n))
        if scene is not None and splits.is_heldout(scene) == heldout:
            return scene


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{split}:{index}")


def _make_chunk(args: tuple[str, str, int, int, int, int]) -> list[dict]:
    out_dir, split, seed, start, stop, resolution = args
    records = []
    img_dir = Path(out_dir) / "images" / split
    for i in range(start, stop):
        rng = _rng(seed, split, i)
        scene = sample_scene(rng, heldout=(split == "test_heldout"))
        rel_path = f"images/{split}/{i:07d}.png"
        render(scene, resolution).save(img_dir / f"{i:07d}.png", optimize=False, compress_level=1)
        rec: dict = {"id": f"{split}-{i:07d}", "image": rel_path, "scene": scene.to_dict()}
        if split == "train":
            rec["caption"] = caption(scene, rng)
            rec["conversations"] = conversation(scene, rng)
        else:
            category = UND_CATEGORIES[i % len(UND_CATEGORIES)]
            q, a, spec = question(scene, rng, category)
            rec.update({"question": q, "answer": a, "category": spec["category"], "spec": spec})
        records.append(rec)
    return records


def _run(out: Path, split: str, num: int, seed: int, resolution: int, workers: int) -> list[dict]:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(2000, num // max(1, workers * 4) or 1))
    tasks = [(str(out), split, seed, s, min(num, s + chunk), resolution) for s in range(0, num, chunk)]
    if workers <= 1:
        return [r for t in tasks for r in _make_chunk(t)]
    with ProcessPoolExecutor(workers) as pool:
        return [r for part in pool.map(_make_chunk, tasks) for r in part]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def generation_prompts(seed: int, per_tag: int, heldout: bool) -> list[dict]:
    rng = random.Random(f"{seed}:geneval:{heldout}")
    tags = COMPOSITIONAL_TAGS if heldout else GENEVAL_TAGS
    return [make_spec(tag, rng, heldout=heldout) for tag in tags for _ in range(per_tag)]


def write_dataset(out: str | Path, num: int, seed: int = 0, resolution: int = 64, num_test: int = 600,
                  prompts_per_tag: int = 50, workers: int = 2) -> dict:
    """Write the dataset (``num`` training scenes, ``num_test`` per test split); returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = _run(out, "train", num, seed, resolution, workers)
    llava = [{"id": r["id"], "image": r["image"], "conversations": r["conversations"]} for r in train]
    (out / "llava_train.json").write_text(json.dumps(llava))
    _write_jsonl(out / "t2i_train.jsonl", [{"id": r["id"], "caption": r["caption"], "image": r["image"]} for r in train])
    _write_jsonl(out / "scenes_train.jsonl", [{"id": r["id"], **r["scene"]} for r in train])
    counts = {"train": len(train)}
    for split, name in (("test_heldin", "vqa_heldin"), ("test_heldout", "vqa_heldout")):
        rows = _run(out, split, num_test, seed, resolution, workers)
        _write_jsonl(out / f"{name}.jsonl", [{k: r[k] for k in ("id", "image", "question", "answer", "category", "spec")}
                                            for r in rows])
        _write_jsonl(out / f"scenes_{split}.jsonl", [{"id": r["id"], **r["scene"]} for r in rows])
        counts[name] = len(rows)
    for heldout, name in ((False, "geneval_heldin"), (True, "geneval_heldout")):
        prompts = generation_prompts(seed, prompts_per_tag, heldout)
        _write_jsonl(out / f"{name}.jsonl", prompts)
        counts[name] = len(prompts)
    manifest = {
        "seed": seed, "resolution": resolution, "counts": counts,
        "vocabulary": {"shapes": list(SHAPES), "colors": COLORS, "relations": list(RELATIONS)},
        "heldout": {"color_shape": sorted(splits.HELDOUT_COLOR_SHAPE),
                    "count_shape": sorted(splits.HELDOUT_COUNT_SHAPE),
                    "relations": sorted(splits.HELDOUT_RELATIONS)},
        "files": sorted(p.name for p in out.iterdir() if p.is_file()) + ["manifest.json"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


HF_SPLITS = {"train": "llava_train.json", "t2i": "t2i_train.jsonl", "vqa_heldin": "vqa_heldin.jsonl",
             "vqa_heldout": "vqa_heldout.jsonl"}


def load_hf_dataset(root: str | Path, split: str = "train"):
    """A ShapeWorld split as a Hugging Face ``datasets.Dataset`` with a decoded ``image`` column."""
    import datasets

    root = Path(root)
    if split not in HF_SPLITS:
        raise ValueError(f"unknown ShapeWorld split {split!r} (valid: {', '.join(HF_SPLITS)})")
    path = root / HF_SPLITS[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate the dataset with "
                                f"`python -m unified_mllm.shapeworld --out {root} --num N`")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        r["image"] = str(root / r["image"])
        if "spec" in r:
            r["spec"] = json.dumps(r["spec"])
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("image", datasets.Image())
