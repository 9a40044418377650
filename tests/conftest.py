from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def project_root() -> Path:
    return ROOT


def python_cmd(*args: str) -> list[str]:
    """A command that runs this interpreter (the project venv) on ``args``."""
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def shapeworld_tiny(tmp_path_factory) -> Path:
    """A small ShapeWorld dataset (24 training scenes, 32 px) written by the real generator."""
    from unified_mllm.shapeworld.dataset import write_dataset

    out = tmp_path_factory.mktemp("shapeworld_tiny")
    write_dataset(out, num=24, resolution=32, num_test=2, prompts_per_tag=1, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_wintok():
    """A randomly initialised, frozen WinTok for 32 px images: 4 semantic tokens, 4 codebooks × 16 positions."""
    import torch

    from tokenizer import WinTok, WinTokConfig

    torch.manual_seed(0)
    return WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                    decoder_num_heads=2, num_semantic_tokens=4, codebook_size=32)).freeze()
