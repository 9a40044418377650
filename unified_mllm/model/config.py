"""UnifiedConfig: everything needed to rebuild the unified model from a saved directory (JSON)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VisionSizes:
    num_codebooks: int
    """Sub-codebooks per pixel position."""
    codebook_size: int
    """Entries per sub-codebook."""
    codebook_dim: int
    """Width of one sub-codebook entry."""
    num_positions: int
    """Pixel-token positions per image."""
    num_semantic_tokens: int
    """Semantic tokens per image."""
    semantic_dim: int
    """Width of a semantic token."""
    wintok_hidden_size: int = 0
    """WinTok encoder width (for the causal-projection generation embedding)."""


@dataclass
class UnifiedConfig:
    llm_config: dict[str, Any]
    """The Hugging Face config of the LLM (``config.to_dict()``)."""
    special_ids: dict[str, Any]
    """SpecialTokenIds as a dict."""
    vision: VisionSizes
    """WinTok sizes the heads are built for."""
    understanding_input: str = "semantic"
    """semantic | pixel | both."""
    projector_type: str = "mlp2x_gelu"
    """Understanding projector."""
    projector_slot_embedding: bool = False
    """A learned embedding per image slot is added to the projected tokens."""
    gen_embedding: str = "sum"
    """sum | causal_proj."""
    gen_position_embedding: bool = False
    """Learned row and column embeddings of the next grid position added to the generation slots' inputs."""
    gen_head: str = "depth"
    """depth | parallel."""
    depth_layers: int = 2
    """Layers of the depth head."""
    depth_hidden_size: int = 0
    """Width of the depth head (0: the LLM's width)."""
    cfg_drop_prob: float = 0.1
    """Caption dropout used in training (read by inference)."""
    uncond_prompt: str = "<unconditional>"
    """The unconditional prompt for CFG (training and inference)."""
    new_token_ids: list[int] = field(default_factory=list)
    """Token ids added by this project (their embedding rows train even under LoRA)."""
    wintok_hash: str | None = None
    """identity_hash() of the WinTok the model was trained with."""
    chat_template: str | None = None
    """The Jinja template the understanding data was rendered with (inference renders prompts with it; None: the
    tokenizer's own)."""

    @property
    def num_und_slots(self) -> int:
        v = self.vision
        return {"semantic": v.num_semantic_tokens, "pixel": v.num_positions,
                "both": v.num_semantic_tokens + v.num_positions}[self.understanding_input]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UnifiedConfig:
        d = dict(d)
        d["vision"] = VisionSizes(**d["vision"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> UnifiedConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
