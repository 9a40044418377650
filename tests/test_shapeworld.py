"""ShapeWorld: deterministic rendering, judge and graders, held-out splits, the dataset CLI and its loaders."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from unified_mllm.shapeworld.dataset import load_hf_dataset, sample_scene
from unified_mllm.shapeworld.degrade import DEGRADATIONS
from unified_mllm.shapeworld.grade import (
    GENEVAL_TAGS,
    grade_answer,
    grade_generation,
    normalize_answer,
    summarise,
)
from unified_mllm.shapeworld.judge import detect
from unified_mllm.shapeworld.prompts import make_spec, scene_for_spec, violating_scene
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.scene import Scene, ShapeObject
from unified_mllm.shapeworld.splits import heldout_reasons, is_heldout
from unified_mllm.shapeworld.text import (
    SHORT_ANSWER,
    UND_CATEGORIES,
    answer_from_detections,
    conversation,
    question,
)

ROOT = Path(__file__).resolve().parents[1]


def test_rendering_is_deterministic_for_a_seed() -> None:
    a = render(sample_scene(random.Random(7), heldout=False))
    b = render(sample_scene(random.Random(7), heldout=False))
    assert a.tobytes() == b.tobytes()
    assert render(sample_scene(random.Random(8), heldout=False)).tobytes() != a.tobytes()


def test_objects_never_overlap() -> None:
    rng = random.Random(0)
    for _ in range(300):
        objs = sample_scene(rng, heldout=False).objects
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


@pytest.mark.parametrize("degradation", ["clean", "noise", "blur", "color_jitter", "jpeg"])
def test_judge_reads_rendered_scenes(degradation: str) -> None:
    rng = random.Random(degradation)
    fn = DEGRADATIONS[degradation]
    wrong = []
    for _ in range(60):
        scene = sample_scene(rng, heldout=False)
        dets = detect(fn(render(scene, 64), rng))
        got = sorted((d.shape, d.color) for d in dets)
        want = sorted((o.shape, o.color) for o in scene.objects)
        if got != want:
            wrong.append((want, got))
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("tag", GENEVAL_TAGS)
def test_grader_accepts_satisfying_and_rejects_violating_images(tag: str) -> None:
    rng = random.Random(tag)
    for _ in range(25):
        spec = make_spec(tag, rng)
        ok, reason = grade_generation(render(scene_for_spec(spec, rng)), spec)
        assert ok, (spec["prompt"], reason)
        bad, _ = grade_generation(render(violating_scene(spec, rng)), spec)
        assert not bad, spec["prompt"]


def test_grader_rejects_an_empty_image_and_summarises_like_geneval() -> None:
    spec = make_spec("single_object", random.Random(0))
    assert grade_generation(render(Scene([])), spec)[0] is False
    scores = summarise([("counting", True), ("counting", False), ("colors", True)])
    assert scores == {"counting": 0.5, "colors": 1.0, "overall": 0.75}


@pytest.mark.parametrize("category", UND_CATEGORIES)
def test_answers_recomputed_from_detections_match(category: str) -> None:
    rng = random.Random(category)
    for _ in range(40):
        scene = sample_scene(rng, heldout=False)
        q, answer, spec = question(scene, rng, category)
        assert answer_from_detections(spec, detect(render(scene))) == answer, q


def test_a_conversation_never_asks_the_same_question_twice() -> None:
    rng = random.Random(0)
    for _ in range(500):
        conv = conversation(sample_scene(rng, heldout=False), rng)
        asked = [c["value"].removeprefix("<image>\n").removesuffix(SHORT_ANSWER) for c in conv[::2]]
        assert len(asked) == len(set(asked)) >= 1
        assert conv[0]["value"].startswith("<image>\n") and all(c["from"] == "gpt" for c in conv[1::2])


def test_vqa_normalisation() -> None:
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Red") == "red"
    assert grade_answer("Yes, there is.", "yes") and not grade_answer("no", "yes")
    assert grade_answer("three", ["3"])
    choices = {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert grade_answer("B", "B", choices) and grade_answer("(B) 2", "B", choices)
    assert grade_answer("The answer is B.", "B", choices) and grade_answer("2", "B", choices)
    assert not grade_answer("C", "B", choices)


def test_heldout_compositions_are_detected() -> None:
    red_triangle = Scene([ShapeObject("triangle", "red", 0.3, 0.3, 0.25)])
    assert heldout_reasons(red_triangle) == ["red triangle"]
    circle_above_square = Scene([ShapeObject("circle", "green", 0.5, 0.2, 0.25),
                                 ShapeObject("square", "green", 0.5, 0.75, 0.25)])
    assert is_heldout(circle_above_square)
    assert not is_heldout(Scene([ShapeObject("circle", "green", 0.5, 0.5, 0.3)]))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw")
    res = subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(out), "--num", "300",
                          "--num-test", "60", "--prompts-per-tag", "5", "--workers", "2", "--seed", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def test_cli_writes_documented_files(dataset_dir: Path) -> None:
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    for name in ("llava_train.json", "t2i_train.jsonl", "vqa_heldin.jsonl", "vqa_heldout.jsonl",
                 "geneval_heldin.jsonl", "geneval_heldout.jsonl", "scenes_train.jsonl"):
        assert (dataset_dir / name).is_file(), name
    assert manifest["counts"]["train"] == 300 and manifest["resolution"] == 64
    llava = json.loads((dataset_dir / "llava_train.json").read_text())
    rec = llava[0]
    assert rec["conversations"][0]["from"] == "human" and rec["conversations"][0]["value"].startswith("<image>\n")
    assert all(c["from"] == ("human" if i % 2 == 0 else "gpt") for i, c in enumerate(rec["conversations"]))
    assert (dataset_dir / rec["image"]).is_file()
    geneval = [json.loads(x) for x in (dataset_dir / "geneval_heldin.jsonl").read_text().splitlines()]
    assert {g["tag"] for g in geneval} == set(GENEVAL_TAGS)


def test_train_split_never_contains_heldout_compositions(dataset_dir: Path) -> None:
    scenes = [json.loads(x) for x in (dataset_dir / "scenes_train.jsonl").read_text().splitlines()]
    assert not any(is_heldout(Scene.from_dict(s)) for s in scenes)
    held = [json.loads(x) for x in (dataset_dir / "scenes_test_heldout.jsonl").read_text().splitlines()]
    assert all(is_heldout(Scene.from_dict(s)) for s in held)


def test_same_seed_same_dataset_across_worker_counts(dataset_dir: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(tmp_path), "--num", "300",
                    "--num-test", "60", "--prompts-per-tag", "5", "--workers", "1", "--seed", "3"],
                   check=True, capture_output=True, cwd=ROOT, timeout=300)
    for name in ("t2i_train.jsonl", "vqa_heldout.jsonl", "geneval_heldout.jsonl"):
        assert (tmp_path / name).read_text() == (dataset_dir / name).read_text()


def test_loads_as_hf_dataset(dataset_dir: Path) -> None:
    ds = load_hf_dataset(dataset_dir, "vqa_heldin")
    assert len(ds) == 60 and ds[0]["image"].size == (64, 64)
    t2i = load_hf_dataset(dataset_dir, "t2i")
    assert set(t2i.column_names) >= {"caption", "image"}
    with pytest.raises(ValueError, match="valid"):
        load_hf_dataset(dataset_dir, "nope")


def test_judge_finds_no_shapes_in_noise_or_smears() -> None:
    """A failed generation (coloured noise, a smear over the whole image) must not pass as shapes."""
    import numpy as np
    from PIL import Image

    from unified_mllm.shapeworld.grade import grade_generation
    from unified_mllm.shapeworld.judge import detect

    rng = np.random.default_rng(0)
    for i in range(5):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        blotchy = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        for arr in (noise, blotchy):
            assert detect(Image.fromarray(arr)) == [], i
            assert not grade_generation(Image.fromarray(arr), {"include": [{"class": "circle", "count": 1}]})[0]
    smear = np.zeros((64, 64, 3), dtype=np.uint8)
    smear[:, :] = (200, 40, 40)  # one colour over the whole image is not a square
    assert detect(Image.fromarray(smear)) == []
