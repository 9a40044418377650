"""WinTok configuration: one dataclass for the released size and the tiny sizes alike."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WinTokConfig:
    image_size: int = 256
    """Input side in pixels (square)."""
    patch_size: int = 16
    """Encoder patch size; the token grid is (image_size / patch_size)²."""
    hidden_size: int = 1152
    """Encoder width (SigLIP so400m: 1152)."""
    num_layers: int = 27
    """Encoder transformer layers."""
    num_heads: int = 16
    """Encoder attention heads."""
    mlp_dim: int = 4304
    """Encoder MLP width."""
    num_semantic_tokens: int = 256
    """N learnable semantic queries appended to the patch tokens (released: 256; code default 32)."""
    semantic_dim: int = 1152
    """Width of the semantic tokens after `projection`."""
    num_codebooks: int = 4
    """Sub-codebooks of the multi-codebook VQ."""
    codebook_size: int = 4096
    """Entries per sub-codebook."""
    codebook_dim: int = 8
    """Width of one sub-codebook entry; the quantised vector is num_codebooks · codebook_dim wide."""
    proj_heads: int = 4
    """Heads of the two attention projections. The released code ties it to num_codebooks (4)."""
    decoder_hidden_size: int = 1152
    """Decoder (SigLIP2 trunk) width."""
    decoder_num_layers: int = 27
    """Decoder transformer layers."""
    decoder_num_heads: int = 16
    """Decoder attention heads."""
    decoder_mlp_dim: int = 4304
    """Decoder MLP width."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of the SigLIP trunks, fc_norm and the GeGLU norm."""
    hidden_act: str = "gelu_pytorch_tanh"
    """Activation of the SigLIP trunks."""
    refine_channels: int = 0
    """Width of an optional residual 3×3-conv refinement of the pixel-shuffled image before `conv_out` (not in the
    released model; 0: none, and the checkpoint layout is exactly the released one)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried with the config (e.g. where a checkpoint came from)."""

    def __post_init__(self) -> None:
        checks = [
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (self.hidden_size % self.num_heads == 0, "hidden_size must be divisible by num_heads"),
            (self.decoder_hidden_size % self.decoder_num_heads == 0,
             "decoder_hidden_size must be divisible by decoder_num_heads"),
            (max(self.hidden_size, self.quant_dim) % self.proj_heads == 0,
             "max(hidden_size, num_codebooks*codebook_dim) must be divisible by proj_heads"),
            (self.num_semantic_tokens >= 1, "num_semantic_tokens must be >= 1"),
            (self.refine_channels >= 0, "refine_channels must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"WinTokConfig: {msg}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2

    @property
    def quant_dim(self) -> int:
        return self.num_codebooks * self.codebook_dim

    @classmethod
    def released(cls, num_semantic_tokens: int = 256) -> WinTokConfig:
        """The released WinTok (siglip2-so400m-patch16-256 encoder and decoder, 4 × 4096 × 8 VQ)."""
        return cls(num_semantic_tokens=num_semantic_tokens)

    @classmethod
    def tiny(cls, image_size: int = 64, patch_size: int = 8, hidden_size: int = 128, num_layers: int = 4,
             num_semantic_tokens: int = 8, codebook_size: int = 256, **overrides: Any) -> WinTokConfig:
        """A CPU-sized WinTok (same code): 64 px, 8×8 tokens, 4 × 256 × 8 codebooks."""
        base = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
                    num_heads=4, mlp_dim=hidden_size * 4, num_semantic_tokens=num_semantic_tokens,
                    semantic_dim=hidden_size, codebook_size=codebook_size, decoder_hidden_size=hidden_size,
                    decoder_num_layers=num_layers, decoder_num_heads=4, decoder_mlp_dim=hidden_size * 4)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WinTokConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"WinTokConfig: unknown fields {unknown} (valid: {sorted(names)})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "wintok", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WinTokConfig:
        data = json.loads(Path(path).read_text())
        data.pop("model_type", None)
        return cls.from_dict(data)
