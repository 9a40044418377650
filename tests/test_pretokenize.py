"""The pretokenize cache: one encoding per image across recipes that share images, identical to encoding afresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import torch

from tokenizer import WinTok, WinTokConfig
from unified_mllm.data.pretokenize import pretokenize

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_sharing_images_encode_them_once(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "sw"
    subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(data), "--num", "40", "--num-test",
                    "4", "--prompts-per-tag", "1", "--resolution", "32", "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    monkeypatch.setenv("SHAPEWORLD_DIR", str(data))
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    wintok = WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                      decoder_num_heads=2, num_semantic_tokens=4, codebook_size=32)).eval()
    first, s1 = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "cache"))
    second, s2 = pretokenize("data_recipes/shapeworld_mixed.yaml", wintok, 16, str(tmp_path / "cache"))
    assert s1["reused"] == 0 and s1["images"] == 40
    assert s2["images"] == 40 and s2["reused"] == 40  # every image came from the align cache
    fresh, s3 = pretokenize("data_recipes/shapeworld_mixed.yaml", wintok, 16, str(tmp_path / "fresh"))
    assert s3["reused"] == 0
    a = datasets.load_from_disk(str(second)).with_format("numpy")
    b = datasets.load_from_disk(str(fresh)).with_format("numpy")
    order_a, order_b = np.argsort(a["key"]), np.argsort(b["key"])
    assert (a["key"][order_a] == b["key"][order_b]).all()
    assert np.array_equal(a["pixel_codes"][order_a], b["pixel_codes"][order_b])
    assert np.array_equal(a["semantic"][order_a], b["semantic"][order_b])


def test_a_moved_dataset_still_reads_its_cache_by_content(tmp_path: Path, monkeypatch) -> None:
    """Pretokenize, then move the dataset: every image is found by the digest of its bytes (the same features as
    under the old path); a file whose bytes changed is not, and says how to fix it."""
    import shutil

    import pytest

    from unified_mllm.config import load_recipe
    from unified_mllm.data.image_features import ImageFeatures
    from unified_mllm.data.pretokenize import cache_dir_for
    from unified_mllm.data.samples import BadSample

    data = tmp_path / "sw"
    subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(data), "--num", "12", "--num-test",
                    "2", "--prompts-per-tag", "1", "--resolution", "32", "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    monkeypatch.setenv("SHAPEWORLD_DIR", str(data))
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    wintok = WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                      decoder_num_heads=2, num_semantic_tokens=4, codebook_size=32)).eval()
    cache, stats = pretokenize("data_recipes/shapeworld_align.yaml", wintok, 16, str(tmp_path / "cache"))
    assert stats["images"] == 12
    images = sorted((data / "images" / "train").glob("*.png"))
    before = ImageFeatures(None, cache)
    want = {p.name: before.get(str(p)) for p in images}

    moved = tmp_path / "elsewhere" / "sw"
    shutil.move(str(data), str(moved))
    recipe = load_recipe("data_recipes/shapeworld_align.yaml")
    recipe.pretokenize_dir = str(tmp_path / "cache")
    assert cache_dir_for("data_recipes/shapeworld_align.yaml", recipe, wintok.identity_hash()) == cache
    after = ImageFeatures(None, cache)
    for p in sorted((moved / "images" / "train").glob("*.png")):
        sem, codes = after.get(str(p))
        assert torch.equal(sem, want[p.name][0]) and torch.equal(codes, want[p.name][1])
    changed = moved / "images" / "train" / images[0].name
    from PIL import Image

    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed)
    with pytest.raises(BadSample, match="not in the pretokenize cache.*unified_mllm.data.pretokenize"):
        ImageFeatures(None, cache).get(str(changed))
