"""The stage trainer: a DeepSpeed engine over the unified model, with resumable checkpoints and metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from unified_mllm.config import to_dict
from unified_mllm.config.stage import StageConfig
from unified_mllm.training import build
from unified_mllm.training.checkpoint import CheckpointManager
from unified_mllm.training.distributed import all_reduce_sum, init_distributed
from unified_mllm.training.ds_config import (
    build_ds_config,
    resolve_precision,
    zero_stage,
)
from unified_mllm.training.ema import WeightAverage
from unified_mllm.training.freeze import apply_trainables
from unified_mllm.training.metrics import LogWindow, MetricsLogger
from unified_mllm.training.optimizer import current_lrs, initialize_engine
from unified_mllm.training.rng import rng_state, seed_everything, set_rng_state
from unified_mllm.training.schedule import task_floor_scale


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the run stops before the optimizer applies it."""


class StageTrainer:
    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.rank, self.world_size = init_distributed()
        seed_everything(cfg.seed)
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.precision = resolve_precision(cfg.deepspeed)
        self.ds_config = build_ds_config(cfg.deepspeed, cfg.optim, self.world_size, self.precision)
        if cfg.model.ema_decay > 0 and zero_stage(self.ds_config) >= 3:
            raise ValueError("model.ema_decay: the weight average needs whole weights on each process; use ZeRO-2 "
                             "(deepspeed.config: stage_configs/deepspeed/zero2.json) or set model.ema_decay: 0")
        self.model, self.tokenizer, self.new_token_ids = build.build_model(cfg, self.ds_config)
        self.pad_id = self.model.config.special_ids["pad_id"]
        self.trainables = apply_trainables(self.model, cfg.train, self.new_token_ids)
        if cfg.deepspeed.gradient_checkpointing:
            self.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine = self.build_engine()
        # the exporting process keeps the average (the others would only hold memory)
        self.ema = WeightAverage(self.model, cfg.model.ema_decay) if cfg.model.ema_decay > 0 and self.rank == 0 else None
        self.loader = build.build_data(cfg, self.model, self.tokenizer, self.rank, self.world_size)
        self.ckpt = CheckpointManager(self.output_dir, cfg.checkpoint.keep_last, self.rank)
        self.step = 0
        self.resumed_from = self.maybe_resume()
        self.logger = MetricsLogger(cfg.logging, self.output_dir, self.rank, cfg.optim.max_steps, self.step,
                                    run_config=to_dict(cfg))

    # ------------------------------------------------------------------------------------------ build
    def build_engine(self):
        return initialize_engine(self.model, self.cfg.optim, self.ds_config)

    # ------------------------------------------------------------------------------------ state/resume
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "data": self.loader.state_dict(), "rng": rng_state()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"model.ema_decay: the checkpoint at step {self.step} was written without a weight "
                                 f"average; resume it with model.ema_decay: 0, or start a new checkpoint.output_dir")
            self.ema.load_state_dict(state["ema"])

    def maybe_resume(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = self.ckpt.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json); "
                                    f"use 'auto', 'never' or a step_XXXXXXXX directory")
        self.load_state_dict(self.ckpt.load(self.engine, path, to_dict(self.cfg)))
        return path

    def save(self) -> Path:
        meta = {"stage": self.cfg.stage, "world_size": self.world_size, "precision": self.precision,
                "config": to_dict(self.cfg)}
        return self.ckpt.save(self.engine, self.step, self.state_dict(), meta)

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self, data_iter) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches. Raises NonFiniteLoss before applying a bad update."""
        totals: dict[str, float] = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0, "tokens": 0.0}
        align: list[float] = []
        tasks: list[str] = []
        for _ in range(self.cfg.optim.grad_accum):
            batch = next(data_iter)
            task = batch.get("task")
            tasks.append(task)
            sources = batch.get("sources", [])
            out = self.engine(**build.model_inputs(batch, self.engine.device), touch_unused=True)
            finite = all_reduce_sum(float(not bool(torch.isfinite(out.loss.detach()).item())))
            if finite > 0:
                raise NonFiniteLoss(
                    f"loss is {out.loss.item()} at step {self.step + 1} (batch task {task!r}, sources "
                    f"{sorted(set(sources))}); stopped before the update — the last complete checkpoint "
                    f"({self.ckpt.latest() or 'none'}) is intact and nothing was saved after it")
            self.engine.backward(out.loss)
            with self.task_lr(tasks if self.engine.is_gradient_accumulation_boundary() else []):
                self.engine.step()
            totals["loss"] += float(out.loss.detach())
            totals["text_loss"] += float(out.text_loss.detach())
            totals["image_loss"] += float(out.image_loss.detach())
            if out.align_loss is not None:
                align.append(float(out.align_loss.detach()))
            totals["tokens"] += float((batch["input_ids"] != self.pad_id).sum())  # real tokens: packed rows pad too
        if self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        n = self.cfg.optim.grad_accum
        return {"loss": totals["loss"] / n, "text_loss": totals["text_loss"] / n,
                "image_loss": totals["image_loss"] / n, "tokens": totals["tokens"],
                "task": "+".join(sorted({str(t) for t in tasks})),  # micro-batches of different tasks: "a+b"
                **({"align_loss": sum(align) / len(align)} if align else {})}

    @contextmanager
    def task_lr(self, tasks: list[str]):
        """The update inside runs at the scheduled lr × the mean over ``tasks`` of ``optim.task_lr_scale`` × the
        task's own floor's schedule against the stage's (``optim.task_min_lr_ratio``); afterwards each group gets the
        scheduler's lr back (the next step's, or this one's when the engine skipped the update)."""
        optim = self.cfg.optim
        scale = 1.0
        if tasks and (optim.task_lr_scale or optim.task_min_lr_ratio):
            scale = sum(optim.task_lr_scale.get(t, 1.0) * task_floor_scale(self.step, optim, t)
                        for t in tasks) / len(tasks)
        if scale == 1.0:
            yield
            return
        groups = self.engine.optimizer.param_groups
        for group in groups:
            group["lr"] *= scale
        try:
            yield
        finally:
            for group, lr in zip(groups, self.engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr

    def fit(self) -> int:
        cfg = self.cfg
        if self.resumed_from:
            self.logger.message(f"resumed from {self.resumed_from} at step {self.step}")
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # under the ZeRO wrapper
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
        self.logger.message(f"stage {cfg.stage}: {self.trainables.describe()}; ZeRO-{zero_stage(self.ds_config)}"
                            f"{', optimizer offload ' + offload if offload not in ('none', None) else ''}, "
                            f"{type(inner).__name__}, {self.precision}, {self.world_size} process(es)")
        data_iter = iter(self.loader)
        window = LogWindow()
        try:
            while self.step < cfg.optim.max_steps:
                step_start = time.time()
                metrics = self.train_step(data_iter)
                window.add(metrics, time.time() - step_start)
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.optim.max_steps:
                    record = {**window.record(all_reduce_sum), **current_lrs(self.engine.optimizer)}
                    record.update({f"skipped/{k}": v for k, v in self.loader.stats().items()})
                    self.logger.log(self.step, record)
                    self.logger.progress(self.step, {"loss": record["loss"], "tok/s": round(record["tokens_per_s"])})
                    window = LogWindow()
                if self.step % cfg.checkpoint.save_every == 0 and self.step < cfg.optim.max_steps:
                    self.save()
                every = cfg.checkpoint.export_every
                if every and self.step % every == 0 and self.step < cfg.optim.max_steps:
                    build.export(self, self.output_dir / "exports" / f"step_{self.step:08d}")
        finally:
            self.loader.close()  # data worker processes, if any
        self.save()
        export_dir = build.export(self)
        self.logger.message(f"stage {cfg.stage} finished at step {self.step}; exported to {export_dir}")
        self.logger.close()
        return 0
