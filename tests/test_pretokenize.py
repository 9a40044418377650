"""The pretokenize cache: one encoding per image across recipes that share images, identical to encoding afresh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import WinTok, WinTokConfig
from unified_mllm.data.image_features import ImageFeatures
from unified_mllm.data.pretokenize import pretokenize
from unified_mllm.data.samples import BadSample

ROOT = Path(__file__).resolve().parents[1]


def shapeworld_and_wintok(tmp_path: Path, monkeypatch, num: int, num_test: int) -> tuple[Path, WinTok]:
    """A small ShapeWorld dataset (SHAPEWORLD_DIR points at it, cwd the repository) and a tiny seeded WinTok."""
    data = tmp_path / "sw"
    subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(data), "--num", str(num),
                    "--num-test", str(num_test), "--prompts-per-tag", "1", "--resolution", "32", "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    monkeypatch.setenv("SHAPEWORLD_DIR", str(data))
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    wintok = WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                      decoder_num_heads=2, num_semantic_tokens=4, codebook_size=32)).eval()
    return data, wintok


def assert_same_rows(one: Path, other: Path) -> None:
    a = datasets.load_from_disk(str(one)).with_format("numpy")
    b = datasets.load_from_disk(str(other)).with_format("numpy")
    order_a, order_b = np.argsort(a["key"]), np.argsort(b["key"])
    assert (a["key"][order_a] == b["key"][order_b]).all()
    assert np.array_equal(a["pixel_codes"][order_a], b["pixel_codes"][order_b])
    assert np.array_equal(a["semantic"][order_a], b["semantic"][order_b])
    assert (a["digest"][order_a] == b["digest"][order_b]).all()  # a reused row carries its image's digest too


def test_recipes_sharing_images_encode_them_once(tmp_path: Path, monkeypatch) -> None:
    """A recipe with exactly another cache's images gets a copy of it; one with some of them reuses those rows.
    Either way the rows are those of encoding afresh."""
    data, wintok = shapeworld_and_wintok(tmp_path, monkeypatch, 40, 4)
    first, s1 = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "cache"))
    stale = first.parent.parent / "shapeworld_mixed" / (first.name + ".shards") / "00000"
    stale.mkdir(parents=True)  # a mixed-recipe run stopped part-way, earlier
    second, s2 = pretokenize("data_recipes/shapeworld_mixed.yaml", wintok, 16, str(tmp_path / "cache"))
    assert s1["reused"] == 0 and s1["images"] == 40
    assert s2["images"] == 40 and s2["copied_from"] == str(first)  # the same 40 images: the align cache, copied
    assert not stale.parent.exists()
    fresh, s3 = pretokenize("data_recipes/shapeworld_mixed.yaml", wintok, 16, str(tmp_path / "fresh"))
    assert s3["reused"] == 0 and "copied_from" not in s3
    assert_same_rows(second, fresh)

    lines = (data / "t2i_train.jsonl").read_text().splitlines()
    (data / "t2i_half.jsonl").write_text("\n".join(lines[:25]) + "\n")
    half = tmp_path / "half.yaml"
    half.write_text(Path("data_recipes/shapeworld_align.yaml").read_text().replace("t2i_train.jsonl", "t2i_half.jsonl"))
    part, s4 = pretokenize(str(half), wintok, 16, str(tmp_path / "cache"))
    assert s4["images"] == 25 and s4["reused"] == 25  # a subset: row by row from the caches beside it
    part_fresh, _ = pretokenize(str(half), wintok, 16, str(tmp_path / "fresh_half"))
    assert_same_rows(part, part_fresh)


def test_a_moved_dataset_still_reads_its_cache_by_content(tmp_path: Path, monkeypatch) -> None:
    """Pretokenize, then move the dataset: every image is found by the digest of its bytes (the same features as
    under the old path); a file whose bytes changed is not, and says how to fix it. A cache written before digests
    existed reads its images by path only."""
    data, wintok = shapeworld_and_wintok(tmp_path, monkeypatch, 12, 2)
    cache, stats = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "cache"))
    assert stats["images"] == 12
    images = sorted((data / "images" / "train").glob("*.png"))
    before = ImageFeatures(None, cache)
    want = {p.name: before.get(str(p)) for p in images}
    old = tmp_path / "old_cache"
    datasets.load_from_disk(str(cache)).remove_columns("digest").save_to_disk(str(old))
    assert torch.equal(ImageFeatures(None, old).get(str(images[1]))[1], want[images[1].name][1])

    moved = tmp_path / "elsewhere" / "sw"
    shutil.move(str(data), str(moved))
    after = ImageFeatures(None, cache)
    for p in sorted((moved / "images" / "train").glob("*.png")):
        sem, codes = after.get(str(p))
        assert torch.equal(sem, want[p.name][0]) and torch.equal(codes, want[p.name][1])
    changed = moved / "images" / "train" / images[0].name
    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed)
    with pytest.raises(BadSample, match="not in the pretokenize cache.*unified_mllm.data.pretokenize"):
        ImageFeatures(None, cache).get(str(changed))
    with pytest.raises(BadSample, match="not in the pretokenize cache"):
        ImageFeatures(None, old).get(str(moved / "images" / "train" / images[1].name))


def test_a_pretokenize_interrupted_before_digests_resumes(tmp_path: Path, monkeypatch) -> None:
    """A run of an older version stopped after its first shard (no digest column); this version keeps that shard,
    encodes the rest and joins them: the same cache as one uninterrupted run, digests included."""
    import unified_mllm.data.pretokenize as pt

    _, wintok = shapeworld_and_wintok(tmp_path, monkeypatch, 12, 2)
    monkeypatch.setattr(pt, "SHARD", 8)
    whole, _ = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "whole"))
    full = datasets.load_from_disk(str(whole))
    resumed_out = tmp_path / "resumed" / whole.relative_to(tmp_path / "whole")
    first = resumed_out.parent / (resumed_out.name + ".shards") / "00000"
    full.select(range(8)).remove_columns("digest").save_to_disk(str(first))
    encoded, encode = [], wintok.encode
    monkeypatch.setattr(wintok, "encode", lambda x: encoded.append(len(x)) or encode(x))
    resumed, stats = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "resumed"))
    assert resumed == resumed_out and stats["images"] == 12 and sum(encoded) == 4  # the old shard was kept
    again = datasets.load_from_disk(str(resumed))
    assert again["key"] == full["key"] and again["digest"] == full["digest"]
    assert np.array_equal(np.array(again["pixel_codes"]), np.array(full["pixel_codes"]))


@pytest.mark.parametrize("start", ["auto", "spawn"])
def test_shards_encoded_in_worker_processes_are_the_same_cache(tmp_path: Path, monkeypatch, start: str) -> None:
    """The command's default on a CPU: shards encoded by worker processes (one thread each; forked on Linux, spawned
    elsewhere), joined in key order — the cache one process writes, and an unreadable image is still a counted skip."""
    import unified_mllm.data.pretokenize as pt

    data, wintok = shapeworld_and_wintok(tmp_path, monkeypatch, 20, 2)
    monkeypatch.setattr(pt, "SHARD", 6)  # 4 shards for 2 workers
    if start == "spawn":
        monkeypatch.setattr(pt, "worker_start_method", lambda threads: "spawn")
    elif sys.platform == "linux":
        assert pt.worker_start_method(1) == "fork" and pt.worker_start_method(2) == "spawn"
    one, s1 = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 4, str(tmp_path / "one"), workers=1)
    bad = sorted((data / "images" / "train").glob("*.png"))[3]
    two, s2 = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 4, str(tmp_path / "two"), workers=2)
    assert s1["images"] == s2["images"] == 20 and s2["skipped"] == 0
    assert s1["workers"] == 1 and s2["workers"] == 2
    a = datasets.load_from_disk(str(one)).with_format("numpy")
    b = datasets.load_from_disk(str(two)).with_format("numpy")
    assert list(a["key"]) == list(b["key"]) and list(a["digest"]) == list(b["digest"])
    assert np.array_equal(a["pixel_codes"], b["pixel_codes"])
    np.testing.assert_allclose(np.asarray(a["semantic"], np.float32), np.asarray(b["semantic"], np.float32), atol=2e-3)
    bad.write_bytes(b"not a png")
    _, s3 = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 4, str(tmp_path / "three"), workers=2)
    assert s3["images"] == 19 and s3["skipped"] == 1
