"""Config tree of the tokenizer stage (``train_stage.py --stage tokenizer``): WinTok training with asymmetric
distillation — the semantic tokens are distilled toward a frozen teacher, the pixel tokens are not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unified_mllm.config.base import check
from unified_mllm.config.stage import CheckpointConfig, DeepSpeedSection, LoggingConfig, OptimConfig


@dataclass
class TokenizerModelConfig:
    preset: Literal["tiny", "released"] = "tiny"
    """Starting size: the CPU-sized tiny WinTok or the released size."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """WinTokConfig fields that override the preset (e.g. {image_size: 64, num_semantic_tokens: 16})."""
    init_from: str | None = None
    """Fine-tune from this checkpoint (released .pth, .safetensors or save_pretrained dir); null trains from scratch."""


@dataclass
class TokenizerDataConfig:
    images: str = "runs/quickstart/data/shapeworld/images/train"
    """Folder of training images (searched recursively for .png/.jpg/.jpeg/.webp)."""
    eval_images: str | None = "runs/quickstart/data/shapeworld/images/test_heldin"
    """Folder of images for the end-of-stage reconstruction eval (null: skip)."""
    random_crop: bool = False
    """Random-resized-crop (scale 0.9–1, bicubic) as the released training; off keeps whole ShapeWorld scenes."""
    max_images: int | None = None
    """Use at most this many training images (null: all)."""
    num_workers: int = 1
    """Data-loader worker processes."""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """An unreadable image: skip it (counted and logged) or stop with an error naming the file."""


@dataclass
class TeacherConfig:
    kind: Literal["none", "hf_vision", "shapeworld"] = "shapeworld"
    """Frozen teacher for distillation: a Hugging Face SigLIP/CLIP vision model from `path`, the small ShapeWorld
    teacher (`python -m tokenizer.teacher`), or none."""
    path: str | None = "runs/quickstart/teacher"
    """Local directory of the teacher."""


@dataclass
class TokenizerLossConfig:
    l1: float = 0.2
    """Weight of the L1 reconstruction loss."""
    l2: float = 1.0
    """Weight of the L2 reconstruction loss."""
    vq: float = 1.0
    """Weight of the VQ loss (commitment_beta · commitment + codebook, averaged over sub-codebooks)."""
    commitment_beta: float = 0.25
    """Commitment weight inside the VQ loss."""
    entropy: float = 0.1
    """Weight of the entropy loss (per-sample entropy minus codebook entropy)."""
    entropy_temp: float = 0.01
    """Temperature of the entropy loss."""
    distill: float = 1.0
    """Weight of 1 − cos(teacher embedding, mean semantic token); semantic tokens only."""

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "vq", "entropy", "distill"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.entropy_temp > 0, "entropy_temp", f"must be > 0, got {self.entropy_temp}")


@dataclass
class TokenizerStageConfig:
    stage: Literal["tokenizer"] = "tokenizer"
    """Always tokenizer."""
    seed: int = 42
    """Global seed."""
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    """WinTok size and initialisation."""
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    """Training and evaluation images."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Distillation teacher."""
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    """Loss weights (the released recipe's, GAN not included)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume; the final export is `<output_dir>/export` (save_pretrained form)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
