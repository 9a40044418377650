"""WinTok: the frozen hybrid visual tokenizer (pixel codes for generation, semantic tokens for understanding).

The model's names load on first use, so a process that only preprocesses images (the ShapeWorld teacher) does not
import the model's transformers modules (~3.5 s of its start, NOTES.md, session 31)."""

from __future__ import annotations

import importlib

from tokenizer.config import WinTokConfig
from tokenizer.preprocess import preprocess, to_pil

_LAZY = {"WinTok": "tokenizer.model", "WinTokEncoding": "tokenizer.model", "WinTokLoadError": "tokenizer.checkpoint"}
__all__ = ["WinTok", "WinTokConfig", "WinTokEncoding", "WinTokLoadError", "preprocess", "to_pil"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
