"""The tokenizer stage: WinTok trained with the released losses under the DeepSpeed engine, asymmetric
distillation of the semantic tokens, resumable checkpoints, and a final save_pretrained export + eval."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tokenizer.config import WinTokConfig
from tokenizer.data import ImageStream, list_images
from tokenizer.losses import tokenizer_losses
from tokenizer.model import WinTok
from tokenizer.teacher import load_teacher
from unified_mllm.config import to_dict
from unified_mllm.config.tokenizer_stage import TokenizerStageConfig
from unified_mllm.training.checkpoint import CheckpointManager
from unified_mllm.training.distributed import all_reduce_sum, init_distributed
from unified_mllm.training.ds_config import (
    build_ds_config,
    resolve_precision,
    uses_config_optimizer,
    zero_stage,
)
from unified_mllm.training.freeze import param_groups
from unified_mllm.training.metrics import MetricsLogger
from unified_mllm.training.rng import rng_state, seed_everything, set_rng_state
from unified_mllm.training.schedule import build_scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the run stops before the optimizer applies it."""


def build_wintok(cfg: TokenizerStageConfig) -> WinTok:
    if cfg.model.init_from:
        return WinTok.from_checkpoint(cfg.model.init_from, **cfg.model.overrides)
    base = WinTokConfig.tiny() if cfg.model.preset == "tiny" else WinTokConfig.released()
    return WinTok(WinTokConfig.from_dict({**base.to_dict(), **cfg.model.overrides}))


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerStageConfig):
        self.cfg = cfg
        self.rank, self.world_size = init_distributed()
        seed_everything(cfg.seed)
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.ds_config = build_ds_config(cfg.deepspeed, cfg.optim, self.world_size)
        self.precision = resolve_precision(cfg.deepspeed)
        self.model = build_wintok(cfg).train()
        self.model.decoder_rec_pos_embed.requires_grad_(False)
        self.teacher = load_teacher(cfg.teacher.kind, cfg.teacher.path)
        if self.teacher is not None:
            dim = getattr(self.teacher, "embed_dim", None)
            if dim is not None and dim != self.model.config.semantic_dim:
                raise ValueError(f"teacher.path: the teacher's embedding is {dim}-d but the semantic tokens are "
                                 f"{self.model.config.semantic_dim}-d; set model.overrides.semantic_dim: {dim}")
        self.engine = self.build_engine()
        if self.teacher is not None:
            self.teacher.to(self.engine.device)
        files = list_images(cfg.data.images, cfg.data.max_images)
        self.stream = ImageStream(files, self.model.config.image_size, cfg.optim.micro_batch_size, cfg.seed,
                                  self.rank, self.world_size, cfg.data.random_crop, cfg.data.on_bad_sample)
        self.ckpt = CheckpointManager(self.output_dir, cfg.checkpoint.keep_last, self.rank)
        self.step = 0
        self.resumed_from = self.maybe_resume()
        self.logger = MetricsLogger(cfg.logging, self.output_dir, self.rank, cfg.optim.max_steps, self.step,
                                    run_config=to_dict(cfg))

    def build_engine(self):
        import deepspeed

        optim = self.cfg.optim
        groups = param_groups(self.model, optim.weight_decay)
        if uses_config_optimizer(self.ds_config):
            engine, *_ = deepspeed.initialize(model=self.model, model_parameters=groups, config=self.ds_config,
                                              lr_scheduler=lambda opt: build_scheduler(opt, optim))
        else:
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
            engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config,
                                              lr_scheduler=build_scheduler(optimizer, optim))
        return engine

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.stream.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    def maybe_resume(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = self.ckpt.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
        self.load_state_dict(self.ckpt.load(self.engine, path))
        return path

    def save(self) -> Path:
        meta = {"stage": "tokenizer", "world_size": self.world_size, "precision": self.precision,
                "config": to_dict(self.cfg), "wintok_config": self.model.config.to_dict()}
        return self.ckpt.save(self.engine, self.step, self.state_dict(), meta)

    def train_step(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _ in range(self.cfg.optim.grad_accum):
            images = next(self.stream).to(self.engine.device)
            with torch.no_grad():
                teacher_emb = self.teacher(images) if self.teacher is not None else None
            out = self.engine(images)
            losses = tokenizer_losses(out, images, teacher_emb, self.cfg.loss)
            if all_reduce_sum(float(not torch.isfinite(losses.total.detach()).item())) > 0:
                raise NonFiniteLoss(f"loss is {losses.total.item()} at step {self.step + 1} (images from "
                                    f"{self.cfg.data.images}); stopped before the update — the last complete "
                                    f"checkpoint ({self.ckpt.latest() or 'none'}) is intact")
            self.engine.backward(losses.total)
            self.engine.step()
            for k, v in losses.scalars().items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.optim.grad_accum
        self.step += 1
        return totals

    def fit(self) -> int:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.resumed_from:
            self.logger.message(f"resumed from {self.resumed_from} at step {self.step}")
        self.logger.message(f"stage tokenizer: WinTok {n_params / 1e6:.2f}M parameters, teacher {cfg.teacher.kind}, "
                            f"ZeRO-{zero_stage(self.ds_config)}, {self.precision}, {self.world_size} process(es); "
                            f"LPIPS and GAN losses are not used")
        t0, images_seen = time.time(), 0
        while self.step < cfg.optim.max_steps:
            metrics = self.train_step()
            images_seen += cfg.optim.micro_batch_size * cfg.optim.grad_accum
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.optim.max_steps:
                dt = max(time.time() - t0, 1e-9)
                record = {**metrics, "lr": self.engine.get_lr()[0],
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
            self.model.eval().save_pretrained(export)
            if cfg.data.eval_images:
                from tokenizer.eval import evaluate

                result = evaluate(WinTok.from_pretrained(export).freeze(), cfg.data.eval_images, max_images=500,
                                  grid_path=self.output_dir / "reconstructions.png")
                (self.output_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
                self.logger.message(f"eval on {cfg.data.eval_images}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
        self.logger.message(f"stage tokenizer finished at step {self.step}; exported to {export}")
        self.logger.close()
        return 0
