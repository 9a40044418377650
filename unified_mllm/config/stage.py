"""The typed config tree of a training stage: ``stage_configs/<stage>.yaml`` → :class:`StageConfig`.

Each component reads only its own section (``cfg.optim`` goes to the optimizer builder, ``cfg.data`` to
the data pipeline, …). Every field has a docstring under it; ``train_stage.py --help`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unified_mllm.config.base import check

STAGES = ("align", "sft", "t2i", "mixed")
Stage = Literal["align", "sft", "t2i", "mixed"]


@dataclass
class LLMConfig:
    path: str | None = None
    """Local directory of a Hugging Face causal LM (e.g. Qwen2.5-1.5B-Instruct). Null: build from `arch` at random init."""
    arch: dict[str, Any] = field(default_factory=dict)
    """With `path` null: a transformers config for random init, e.g. {model_type: qwen2, hidden_size: 256, ...}."""
    text_tokenizer: str | None = None
    """Directory (or SentencePiece .model file) of the text tokenizer. Null: the one saved beside `path`."""
    attn_implementation: Literal["auto", "sdpa_packed", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Attention kernel. auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa_packed (PyTorch sdpa
    per packed sample, without the dense packed mask that plain sdpa computes in full)."""

    def __post_init__(self) -> None:
        check(self.path is not None or bool(self.arch), "path", "set a local model path or an `arch` for random init")


@dataclass
class ProjectorConfig:
    type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """Understanding projector from vision features to LLM embeddings (LLaVA-1.5 uses mlp2x_gelu)."""
    slot_embedding: bool = False
    """Add a learned embedding per image slot to the projected tokens, so the LLM knows which region a token stands
    for (WinTok's semantic tokens carry content, not their place; "is the circle left of the square?" needs it)."""


@dataclass
class SemanticAlignConfig:
    weight: float = 0.0
    """Weight of the alignment loss; 0 turns it off. REPA (Yu et al., 2025) and ARRA (Xie et al., 2025) align a
    generator's hidden states with a frozen vision encoder's features: here an MLP reads the LLM's hidden state before
    each generation slot at ``layer`` and is pulled (1 − cos) toward the WinTok semantic tokens of the image being
    drawn, so the caption must predict what the image holds. Training only: the MLP is not exported."""
    target: Literal["pooled", "grid"] = "pooled"
    """pooled: every slot aligns with the mean of the image's semantic tokens (any WinTok). grid: a slot aligns with the
    semantic token of the region it lies in, for WinToks whose semantic tokens form a square grid of regions (the
    ShapeWorld preset distils them per region: ``loss.distill_tokens``)."""
    layer: int = 0
    """The LLM layer whose output is aligned (1 … num_hidden_layers); 0: the middle one (REPA aligns an early layer)."""
    center: bool = False
    """Subtract a running mean of the targets (momentum 0.99) before the cosine: the alignment is then on what sets an
    image apart, not on what every image shares (ShapeWorld's mostly empty scenes make the uncentred pooled target
    nearly the same for every image)."""

    def __post_init__(self) -> None:
        check(self.weight >= 0.0, "weight", f"must be >= 0 (0: off), got {self.weight}")
        check(self.layer >= 0, "layer", f"must be >= 0 (0: the middle layer), got {self.layer}")


@dataclass
class GenerationHeadConfig:
    embedding: Literal["sum", "causal_proj"] = "sum"
    """Pixel-code input embedding: sum of per-sub-codebook embeddings (LlamaGen), or WinTok codebook lookup + causal projection (UniTok/Liquid)."""
    position_embedding: bool = False
    """Add learned row and column embeddings of the grid position each generation slot predicts next (DALL·E and
    Parti style), so the LLM need not count back to <boi> to know where in the image it is."""
    head: Literal["depth", "parallel"] = "depth"
    """Sub-code predictor: a small depth transformer over the sub-codes of a position, or independent parallel heads."""
    depth_layers: int = 2
    """Layers of the depth transformer (head: depth)."""
    depth_hidden_size: int = 0
    """Width of the depth transformer (head: depth); 0: the LLM's width. It runs over every sub-code of every image
    position, so on a small LLM it can cost more than the LLM itself; a narrower one reads the LLM's hidden state
    through a linear projection."""
    semantic_align: SemanticAlignConfig = field(default_factory=SemanticAlignConfig)
    """An auxiliary loss that aligns the LLM's hidden states at the generation slots with WinTok's semantic tokens of
    the target image (off by default)."""

    def __post_init__(self) -> None:
        check(self.depth_layers >= 1, "depth_layers", f"must be >= 1, got {self.depth_layers}")
        check(self.depth_hidden_size >= 0, "depth_hidden_size", f"must be >= 0 (0: the LLM's width), got "
              f"{self.depth_hidden_size}")


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(arch={"model_type": "qwen2"}))
    """The language model backbone."""
    wintok: str | None = None
    """WinTok checkpoint: a save_pretrained directory, a released .pth, or .safetensors. Frozen in every stage."""
    understanding_input: Literal["semantic", "pixel", "both"] = "semantic"
    """What the LLM sees of an image: WinTok semantic tokens, pixel-code embeddings, or both concatenated."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Understanding projector."""
    generation: GenerationHeadConfig = field(default_factory=GenerationHeadConfig)
    """Image-generation embedding and head."""
    init_from: str | None = None
    """A previous stage's exported directory to start from (align → sft → t2i). Null: fresh projector and heads."""
    ema_decay: float = 0.0
    """Exponential moving average of the trainable weights (e.g. 0.998), kept in fp32 by the first process; every
    export (final and ``checkpoint.export_every``) holds the average, checkpoints keep it for resume. Needs whole
    weights on each process: ZeRO-0/1/2, not ZeRO-3. 0: off."""

    def __post_init__(self) -> None:
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainablesConfig:
    projector: bool = True
    """Train the understanding projector."""
    llm: Literal["frozen", "full", "lora"] = "full"
    """How the LLM trains. Under lora, new token rows, projector and generation modules still train fully."""
    generation: bool = False
    """Train the generation embedding and head."""
    lora_rank: int = 64
    """LoRA rank (llm: lora)."""
    lora_alpha: int = 128
    """LoRA alpha (llm: lora)."""
    lora_dropout: float = 0.05
    """LoRA dropout (llm: lora)."""

    def __post_init__(self) -> None:
        check(self.lora_rank > 0, "lora_rank", f"must be > 0, got {self.lora_rank}")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")


@dataclass
class CFGDropConfig:
    drop_prob: float = 0.1
    """Probability that a training caption is replaced by the unconditional prompt (classifier-free guidance)."""
    uncond_prompt: str = "<unconditional>"
    """The unconditional prompt; inference uses the same one for the unconditional branch."""

    def __post_init__(self) -> None:
        check(0.0 <= self.drop_prob <= 1.0, "drop_prob", f"must be in [0, 1], got {self.drop_prob}")


@dataclass
class DataConfig:
    recipe: str = "data_recipes/shapeworld_sft.yaml"
    """Data recipe YAML (sources, weights, tasks), relative to the project root or absolute."""
    max_seq_len: int = 2048
    """Context length of a training sequence (tokens, image slots included)."""
    task_max_seq_len: dict[str, int] = field(default_factory=dict)
    """Stage mixed: the context length of one task's sequences, e.g. {generation: 256}; a task not named uses
    max_seq_len. With packing, a shorter generation row holds fewer images, so a generation step costs less while the
    understanding rows keep their length (NOTES.md, session 23)."""
    packing: bool = True
    """Pack samples to max_seq_len with position ids restarting per sample and no cross-sample attention; false pads."""
    template: str = "auto"
    """Chat template: auto (plain for align, the LLM's own for sft), plain, or a registered explicit template."""
    cfg: CFGDropConfig = field(default_factory=CFGDropConfig)
    """Caption dropout for classifier-free guidance (shared with inference)."""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """A corrupt image, malformed record or over-long sample: skip it (counted and logged) or stop with an error."""
    num_workers: int = 2
    """Worker processes that tokenize records and read image features ahead of the stream (0: in the main process); the batches, their order and the resume position are the same for every value."""
    seed: int = 0
    """Seed of the mixture interleaving and caption dropout."""

    def __post_init__(self) -> None:
        check(self.max_seq_len >= 16, "max_seq_len", f"must be >= 16, got {self.max_seq_len}")
        for task, length in self.task_max_seq_len.items():
            check(length >= 16, f"task_max_seq_len.{task}", f"must be >= 16, got {length}")  # the loader checks the task
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW on every parameter. muon: Muon (momentum orthogonalised by Newton–Schulz; DeepSpeed's
    MuonWithAuxAdam, ZeRO-1/2/3) on the weight matrices of linear layers, AdamW at ``lr`` on the rest (embeddings,
    the output head, convolutions, norms, biases, codebooks)."""
    lr: float = 2e-5
    """Peak learning rate (of AdamW; with optimizer muon, of the parameters Muon does not take)."""
    muon_lr: float = 0.02
    """Optimizer muon: peak learning rate of the Muon half, in spectral norm per update (the schedule scales it as
    it scales lr)."""
    muon_momentum: float = 0.95
    """Optimizer muon: momentum of the Muon half (Nesterov)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of max_steps spent in linear warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine decay floor as a fraction of lr."""
    task_min_lr_ratio: dict[str, float] = field(default_factory=dict)
    """Stage mixed: a task's own cosine floor, e.g. {understanding: 0.4}: that task's steps update at the schedule
    decaying to this fraction of lr instead of min_lr_ratio (the same warm-up and cosine; the logged lr stays the
    schedule's). A task not named uses min_lr_ratio. Understanding's last skill (multiple choice) stops learning
    where the rate falls, while generation wants the low-rate end (NOTES.md, sessions 26–27)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables; not applied with optimizer muon, whose updates have a fixed size)."""
    max_steps: int = 1000
    """Optimizer steps in the stage."""
    micro_batch_size: int = 4
    """Sequences per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    text_loss_weight: float = 1.0
    """Weight of the text-token loss."""
    image_loss_weight: float = 1.0
    """Weight of the image-token (pixel-code) loss."""
    task_ratio: dict[str, float] = field(default_factory=dict)
    """Stage mixed: share of steps per task, e.g. {understanding: 0.5, generation: 0.5}. Empty: from recipe weights."""
    task_micro_batch_size: dict[str, int] = field(default_factory=dict)
    """Stage mixed: sequences per device per micro-step in one task's batches, e.g. {generation: 4}; a task not named
    uses micro_batch_size. Generation learns per step and understanding per token (NOTES.md, session 10), so smaller
    generation batches at a higher generation step share give generation more steps for the same tokens."""
    task_lr_scale: dict[str, float] = field(default_factory=dict)
    """Stage mixed: a task's steps update at the scheduled lr times this, e.g. {generation: 2.0}; a task not named
    uses 1 (a step of several micro-batches uses their mean). Generation alone learns faster at 2e-3 than at 1e-3,
    but in the ShapeWorld mixed preset a generation scale of 2 cost understanding without helping generation
    (NOTES.md, session 11), so the preset leaves it unset."""

    def __post_init__(self) -> None:
        check(self.optimizer in ("adamw", "muon"), "optimizer", f"must be adamw or muon, got {self.optimizer!r}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.muon_lr > 0, "muon_lr", f"must be > 0, got {self.muon_lr}")
        check(0.0 <= self.muon_momentum < 1.0, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        for task, share in self.task_ratio.items():
            check(share >= 0, f"task_ratio.{task}", f"must be >= 0, got {share}")
        for task, size in self.task_micro_batch_size.items():
            check(size > 0, f"task_micro_batch_size.{task}", f"must be > 0, got {size}")  # the loader checks the type
        for task, scale in self.task_lr_scale.items():
            check(scale > 0, f"task_lr_scale.{task}", f"must be > 0, got {scale}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for task, floor in self.task_min_lr_ratio.items():
            check(0.0 <= floor <= 1.0, f"task_min_lr_ratio.{task}", f"must be in [0, 1], got {floor}")


@dataclass
class DeepSpeedSection:
    config: str = "stage_configs/deepspeed/zero2.json"
    """DeepSpeed JSON (zero2, zero3, zero3_offload shipped); batch sizes, lr and clipping are filled from this config."""
    precision: Literal["auto", "fp32", "bf16", "bf16_autocast"] = "auto"
    """bf16: DeepSpeed's bf16 (bf16 weights and gradients, fp32 master weights in the optimizer). bf16_autocast:
    fp32 weights, gradients and communication, the forward under ``torch.autocast`` in bf16 (DeepSpeed's
    ``torch_autocast``). auto: bf16 on CUDA with bf16 support; on a CPU with native bf16 matmuls (AVX512-BF16 or
    AMX) bf16_autocast (the MLLM stages; the tokenizer stage stays fp32 on CPU); fp32 elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass to save memory."""


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/default"
    """Where checkpoints, logs and the final export go."""
    save_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep (older ones are deleted after a newer one is complete)."""
    export_every: int = 0
    """Also write a loadable export every N optimizer steps to <output_dir>/exports/step_N (kept, not rotated; LoRA
    merged into a copy): what `python -m eval.curve` scores to draw score against steps. 0: only the final export."""
    resume: str = "auto"
    """auto: resume from the newest complete checkpoint in output_dir if any; never; or a checkpoint path."""

    def __post_init__(self) -> None:
        check(self.save_every > 0, "save_every", f"must be > 0, got {self.save_every}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        check(self.export_every >= 0, "export_every", f"must be >= 0 (0 turns it off), got {self.export_every}")


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    jsonl: bool = True
    """Write metrics.jsonl in the output directory."""
    tensorboard: bool = True
    """Write TensorBoard events in the output directory."""
    wandb_project: str | None = None
    """Weights & Biases project (wandb must be installed); null disables."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class StageConfig:
    stage: Stage = "sft"
    """Which stage this is: align, sft, t2i or mixed."""
    seed: int = 42
    """Global seed (model init, data order, dropout)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model: LLM, WinTok, projector, generation head."""
    train: TrainablesConfig = field(default_factory=TrainablesConfig)
    """What trains in this stage (WinTok never does)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data recipe, template, packing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
