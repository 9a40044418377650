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
    init: Literal["default", "wintok"] = "default"
    """From scratch: `wintok` applies the released code's initialisation (query tokens N(0, 1), 1-D sin-cos query
    position embedding, codebooks uniform ±d^-0.5/36, truncated-normal 0.02 decoder linears); `default` keeps
    PyTorch's. Ignored with init_from."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.99); the export and the eval use the EMA copy. 0: off."""

    def __post_init__(self) -> None:
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")


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
    cache_images: bool = True
    """Keep each decoded training image in memory (uint8) after its first read, and — with random_crop off and a
    frozen teacher — its teacher embedding too, so later epochs neither decode nor run the teacher again."""
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
    distill_tokens: float = 0.0
    """Weight of per-token distillation (not in the released recipe): 1 − cos between semantic token i and the
    teacher's patch tokens pooled to the same square grid (SigLIP's last hidden state; the ShapeWorld teacher's
    last feature map), so each semantic token describes one region and a language model can look objects up in
    them. Semantic tokens only; needs num_semantic_tokens a square and the teacher's token width = semantic_dim.
    0: off."""
    edge: float = 0.0
    """Weight of the L1 distance between the horizontal and vertical pixel differences of reconstruction and
    original (sharp edges; not in the released recipe). 0: off."""
    patch_consistency: float = 0.0
    """Weight of a term that gives patches with identical pixels (within a batch) the same soft code assignment, so
    a flat background is not coded differently depending on the rest of the image (not in the released recipe;
    uses entropy_temp as the softmax temperature). 0: off."""
    patch_consistency_min_share: float = 0.0
    """patch_consistency only for groups of identical patches holding at least this share of a batch's patches
    (0.2: a flat background, not the interiors of objects). 0: every group of two or more."""
    teacher_features: float = 0.0
    """Weight of a perceptual loss in the frozen teacher's conv feature maps (LPIPS-style: channel-normalised
    squared distance, summed over its four stages) between reconstruction and original — an LPIPS stand-in that
    needs no download; teacher.kind: shapeworld only. Reaches the pixel path (no effect on the semantic tokens'
    distillation). 0: off."""
    perceptual: float = 1.0
    """Weight of LPIPS-VGG; used only when lpips_vgg16 and lpips_linear are given (the log says so)."""
    lpips_vgg16: str | None = None
    """Local torchvision vgg16 state dict (features.* keys) for LPIPS; nothing is downloaded."""
    lpips_linear: str | None = None
    """Local lpips linear-layer weights (the lpips package's weights/v0.1/vgg.pth)."""
    gan: float = 0.0
    """Weight of the adversarial loss (PatchGAN discriminator, hinge, VQGAN adaptive weight). 0: off."""
    gan_start: int = 0
    """Optimizer step from which the discriminator trains and the adversarial loss is applied."""
    gan_disc_channels: int = 64
    """Width of the discriminator's first layer."""
    gan_disc_layers: int = 3
    """Strided layers of the discriminator."""
    gan_disc_lr: float | None = None
    """Discriminator learning rate (null: optim.lr)."""

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "vq", "entropy", "distill", "distill_tokens", "edge", "patch_consistency", "teacher_features", "perceptual",
                     "gan"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.entropy_temp > 0, "entropy_temp", f"must be > 0, got {self.entropy_temp}")
        check(0 <= self.patch_consistency_min_share < 1, "patch_consistency_min_share",
              f"must be in [0, 1), got {self.patch_consistency_min_share}")


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
