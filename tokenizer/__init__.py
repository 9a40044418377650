"""WinTok: the frozen hybrid visual tokenizer (pixel codes for generation, semantic tokens for understanding)."""

from tokenizer.checkpoint import WinTokLoadError
from tokenizer.config import WinTokConfig
from tokenizer.model import WinTok, WinTokEncoding
from tokenizer.preprocess import preprocess, to_pil

__all__ = ["WinTok", "WinTokConfig", "WinTokEncoding", "WinTokLoadError", "preprocess", "to_pil"]
