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
