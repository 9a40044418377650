"""The tokenizer stage: WinTok trained with the released losses under the DeepSpeed engine, asymmetric
distillation of the semantic tokens, resumable checkpoints, and a final save_pretrained export + eval."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizer.config import WinTokConfig
from tokenizer.data import ImageStream, list_images
from tokenizer.gan import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from tokenizer.losses import pool_tokens, tokenizer_losses
from tokenizer.lpips import lpips_from_paths
from tokenizer.model import WinTok
from tokenizer.teacher import load_teacher
from unified_mllm.config import to_dict
from unified_mllm.config.tokenizer_stage import TokenizerStageConfig
from unified_mllm.training.checkpoint import CheckpointManager
from unified_mllm.training.distributed import all_reduce_sum, init_distributed
from unified_mllm.training.ds_config import (
    build_ds_config,
    resolve_precision,
    zero_stage,
)
from unified_mllm.training.ema import warmed_decay
from unified_mllm.training.metrics import MetricsLogger
from unified_mllm.training.optimizer import current_lrs, initialize_engine
from unified_mllm.training.rng import rng_state, seed_everything, set_rng_state


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the run stops before the optimizer applies it."""


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """(length, dim) sin-cos embedding of positions 0..length-1 (sin half, then cos half)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


@torch.no_grad()
def apply_wintok_init(model: WinTok) -> WinTok:
    """The released training code's initialisation of a from-scratch WinTok (the SigLIP trunks keep theirs)."""
    c = model.config
    nn.init.normal_(model.query_tokens, std=1.0)
    model.query_tokens_pos_embed.copy_(sincos_1d(c.hidden_size, c.num_semantic_tokens))
    bound = c.codebook_dim**-0.5 / 36
    for book in model.quantizer.codebooks:
        nn.init.uniform_(book.codebook.weight, -bound, bound)
    for module in [*model.decode_task_layer_1, *model.decoder.modules()]:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return model


def build_wintok(cfg: TokenizerStageConfig) -> WinTok:
    if cfg.model.init_from:
        return WinTok.from_checkpoint(cfg.model.init_from, **cfg.model.overrides)
    base = WinTokConfig.tiny() if cfg.model.preset == "tiny" else WinTokConfig.released()
    model = WinTok(WinTokConfig.from_dict({**base.to_dict(), **cfg.model.overrides}))
    return apply_wintok_init(model) if cfg.model.init == "wintok" else model


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerStageConfig):
        self.cfg = cfg
        self.rank, self.world_size = init_distributed()
        seed_everything(cfg.seed)
        self.output_dir = Path(cfg.checkpoint.output_dir)
        # precision auto on a CPU: fp32, not bf16 autocast, which ran this stage slower (0.143 against 0.137 s a step:
        # its convolutions and small ops gain nothing) and learnt less (judge agreement 0.986 against 0.992; NOTES.md,
        # session 24). An explicit deepspeed.precision is honoured.
        self.precision = resolve_precision(cfg.deepspeed, cpu_autocast=False)
        self.ds_config = build_ds_config(cfg.deepspeed, cfg.optim, self.world_size, self.precision)
        self.model = build_wintok(cfg).train()
        # DeepSpeed's bf16 casts parameters, not buffers (WinTok's normalisation constants, its zero key bias); a
        # whole bf16 model, fed bf16 images, is what the released bf16 path runs
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model.to(self.dtype)
        self.model.decoder_rec_pos_embed.requires_grad_(False)
        self.teacher = load_teacher(cfg.teacher.kind, cfg.teacher.path)
        if self.teacher is not None:
            dim = getattr(self.teacher, "embed_dim", None)
            if dim is not None and dim != self.model.config.semantic_dim:
                raise ValueError(f"teacher.path: the teacher's embedding is {dim}-d but the semantic tokens are "
                                 f"{self.model.config.semantic_dim}-d; set model.overrides.semantic_dim: {dim}")
        if cfg.loss.distill_tokens > 0 and self.teacher is not None:  # teacher.kind none: no distillation at all
            if getattr(self.teacher, "pooling", "tokens") != "tokens":
                raise ValueError(f"loss.distill_tokens: the ShapeWorld teacher at {cfg.teacher.path} was saved without "
                                 f"token embeddings; retrain it with `python -m tokenizer.teacher --data DIR --out "
                                 f"{cfg.teacher.path}` or set loss.distill_tokens: 0")
            if self.teacher.token_dim != self.model.config.semantic_dim:
                raise ValueError(f"loss.distill_tokens: the teacher's tokens are {self.teacher.token_dim}-d but the "
                                 f"semantic tokens are {self.model.config.semantic_dim}-d; set "
                                 f"model.overrides.semantic_dim: {self.teacher.token_dim} or loss.distill_tokens: 0")
        if cfg.loss.teacher_features > 0 and not hasattr(self.teacher, "feature_maps"):
            raise ValueError(f"loss.teacher_features: teacher.kind {cfg.teacher.kind!r} has no conv feature maps; "
                             f"use teacher.kind: shapeworld, or LPIPS (loss.lpips_vgg16 + loss.lpips_linear)")
        if zero_stage(self.ds_config) >= 3 and cfg.model.ema_decay > 0:
            raise ValueError("model.ema_decay: the weight average needs whole weights on each process; use ZeRO-2 "
                             "(deepspeed.config: stage_configs/deepspeed/zero2.json) or set model.ema_decay: 0")
        # the average is kept in fp32: a bf16 copy would drop the (1 − decay)-sized steps below its resolution
        self.ema = (copy.deepcopy(self.model).float().eval().requires_grad_(False) if cfg.model.ema_decay > 0
                    else None)
        self.engine = self.build_engine()
        if self.teacher is not None:
            self.teacher.to(self.engine.device)
        self.perceptual = lpips_from_paths(cfg.loss.lpips_vgg16, cfg.loss.lpips_linear)
        if self.perceptual is not None:
            self.perceptual.to(self.engine.device)
        self.disc = self.disc_opt = None
        if cfg.loss.gan > 0:
            if zero_stage(self.ds_config) >= 3:
                raise ValueError("loss.gan: the adversarial loss needs whole decoder weights for its adaptive "
                                 "weight; use ZeRO-2 (deepspeed.config: stage_configs/deepspeed/zero2.json)")
            self.disc = PatchDiscriminator(cfg.loss.gan_disc_channels, cfg.loss.gan_disc_layers).to(self.engine.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.loss.gan_disc_lr or cfg.optim.lr,
                                              betas=(0.5, 0.9), weight_decay=0.0)
        if self.ema is not None:
            self.ema.to(self.engine.device)
        files = list_images(cfg.data.images, cfg.data.max_images)
        self.stream = ImageStream(files, self.model.config.image_size, cfg.optim.micro_batch_size, cfg.seed,
                                  self.rank, self.world_size, cfg.data.random_crop, cfg.data.on_bad_sample,
                                  cache=cfg.data.cache_images)
        # a frozen teacher on un-cropped images gives each file one embedding: compute it once — when a file is seen
        # more than once at all (the ShapeWorld preset sees 38,400 of 50,000 images once: a cache would only hold memory)
        seen = cfg.optim.max_steps * cfg.optim.micro_batch_size * cfg.optim.grad_accum * self.world_size
        self.teacher_cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = (
            {} if self.teacher is not None and cfg.data.cache_images and not cfg.data.random_crop
            and seen > len(files) else None)
        self.ckpt = CheckpointManager(self.output_dir, cfg.checkpoint.keep_last, self.rank)
        self.step = 0
        self.resumed_from = self.maybe_resume()
        self.logger = MetricsLogger(cfg.logging, self.output_dir, self.rank, cfg.optim.max_steps, self.step,
                                    run_config=to_dict(cfg))

    def build_engine(self):
        return initialize_engine(self.model, self.cfg.optim, self.ds_config)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "data": self.stream.state_dict(), "rng": rng_state()}
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        if self.disc is not None:
            state["disc"] = {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()}
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def maybe_resume(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = self.ckpt.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
        self.load_state_dict(self.ckpt.load(self.engine, path, to_dict(self.cfg)))
        return path

    def save(self) -> Path:
        meta = {"stage": "tokenizer", "world_size": self.world_size, "precision": self.precision,
                "config": to_dict(self.cfg), "wintok_config": self.model.config.to_dict()}
        return self.ckpt.save(self.engine, self.step, self.state_dict(), meta)

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled embedding and, with ``loss.distill_tokens``, the token embeddings of a batch, already pooled to
        the semantic-token grid (so neither the loss nor the cache handles the teacher's full grid)."""
        if self.cfg.loss.distill_tokens > 0:
            emb, tokens = self.teacher.embed_and_tokens(images)
            return emb, pool_tokens(tokens, self.model.config.num_semantic_tokens)
        return self.teacher(images), None

    def teacher_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.teacher is None:
            return None, None
        if self.teacher_cache is None:
            return self.teacher_outputs(images)
        idx = self.stream.last_indices
        todo = [j for j, i in enumerate(idx) if i not in self.teacher_cache]
        if todo:
            emb, tokens = self.teacher_outputs(images[todo])
            for k, j in enumerate(todo):
                self.teacher_cache[idx[j]] = (emb[k].cpu(), None if tokens is None else tokens[k].cpu())
        cached = [self.teacher_cache[i] for i in idx]
        emb = torch.stack([c[0] for c in cached]).to(images.device)
        tokens = None if cached[0][1] is None else torch.stack([c[1] for c in cached]).to(images.device)
        return emb, tokens

    def gan_active(self) -> bool:
        return self.disc is not None and self.step >= self.cfg.loss.gan_start

    def train_step(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        accum = self.cfg.optim.grad_accum
        for _ in range(accum):
            images = next(self.stream).to(self.engine.device)
            teacher_emb, teacher_tokens = self.teacher_embeddings(images)
            out = self.engine(images.to(self.dtype))
            losses = tokenizer_losses(out, images, teacher_emb, self.cfg.loss, self.perceptual, self.teacher,
                                      self.model.config.patch_size, teacher_tokens)
            total = losses.total
            extra: dict[str, float] = {}
            if self.gan_active():
                self.disc.requires_grad_(False)
                g_loss = hinge_g_loss(self.disc(out.reconstruction.float()))  # the discriminator stays fp32
                weight = adaptive_weight(losses.reconstruction, g_loss, self.model.conv_out.weight)
                total = total + self.cfg.loss.gan * weight * g_loss
                extra = {"loss/gan_g": float(g_loss.detach()), "gan/adaptive_weight": float(weight)}
            if all_reduce_sum(float(not torch.isfinite(total.detach()).item())) > 0:
                raise NonFiniteLoss(f"loss is {total.item()} at step {self.step + 1} (images from "
                                    f"{self.cfg.data.images}); stopped before the update — the last complete "
                                    f"checkpoint ({self.ckpt.latest() or 'none'}) is intact")
            self.engine.backward(total)
            self.engine.step()
            if self.gan_active():
                extra["loss/gan_d"] = self.discriminator_step(images, out.reconstruction.detach().float(), accum)
            for k, v in {**losses.scalars(), "loss/total": float(total.detach()), **extra}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if self.gan_active():
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
        self.update_ema()
        self.step += 1
        return totals

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, accum: int) -> float:
        """Accumulate the hinge loss's gradient (averaged over processes); the caller steps once per update."""
        self.disc.requires_grad_(True)
        loss = hinge_d_loss(self.disc(real), self.disc(fake))
        (loss / accum).backward()
        if self.world_size > 1:
            for p in self.disc.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world_size
        return float(loss.detach())

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        averaged = list(self.ema.parameters())  # one fused call per step, as WeightAverage.update
        torch._foreach_lerp_(averaged, [p.detach().to(e.dtype) for e, p in zip(averaged, self.model.parameters())],
                             1.0 - warmed_decay(self.cfg.model.ema_decay, self.step))
        torch._foreach_copy_(list(self.ema.buffers()), list(self.model.buffers()))

    def loss_summary(self) -> str:
        lc = self.cfg.loss
        lpips = (f"LPIPS-VGG on (weight {lc.perceptual})" if self.perceptual is not None else
                 "LPIPS off (no loss.lpips_vgg16 / loss.lpips_linear weights given)")
        gan = (f"GAN on (weight {lc.gan}, from step {lc.gan_start})" if self.disc is not None else "GAN off")
        ema = f"EMA {self.cfg.model.ema_decay} (exported)" if self.ema is not None else "no EMA"
        feats = f"; teacher-feature loss {lc.teacher_features}" if lc.teacher_features > 0 else ""
        return f"{lpips}{feats}; {gan}; {ema}"

    def fit(self) -> int:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.resumed_from:
            self.logger.message(f"resumed from {self.resumed_from} at step {self.step}")
        self.logger.message(f"stage tokenizer: WinTok {n_params / 1e6:.2f}M parameters, teacher {cfg.teacher.kind}, "
                            f"ZeRO-{zero_stage(self.ds_config)}, {self.precision}, {self.world_size} process(es); "
                            f"{self.loss_summary()}")
        t0, images_seen = time.time(), 0
        while self.step < cfg.optim.max_steps:
            metrics = self.train_step()
            images_seen += cfg.optim.micro_batch_size * cfg.optim.grad_accum
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.optim.max_steps:
                dt = max(time.time() - t0, 1e-9)
                record = {**metrics, **current_lrs(self.engine.optimizer),
                          "images_per_s": all_reduce_sum(images_seen) / dt,
                          **{f"skipped/{k}": v for k, v in self.stream.stats().items()}}
                self.logger.log(self.step, record)
                self.logger.progress(self.step, {"loss": metrics["loss/total"], "img/s": round(record["images_per_s"])})
                t0, images_seen = time.time(), 0
            if self.step % cfg.checkpoint.save_every == 0 and self.step < cfg.optim.max_steps:
                self.save()
        self.save()
        export = self.output_dir / "export"
        if self.rank == 0:
            (self.ema if self.ema is not None else self.model).eval().save_pretrained(export)
            if cfg.data.eval_images:
                from tokenizer.eval import evaluate

                result = evaluate(WinTok.from_pretrained(export).freeze(), cfg.data.eval_images, max_images=500,
                                  grid_path=self.output_dir / "reconstructions.png", perceptual=self.perceptual)
                (self.output_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
                self.logger.message(f"eval on {cfg.data.eval_images}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
        self.logger.message(f"stage tokenizer finished at step {self.step}; exported to {export}")
        self.logger.close()
        return 0
