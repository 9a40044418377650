"""Training metrics: JSONL, TensorBoard, wandb (when configured) and a progress bar — all on rank 0."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unified_mllm.config.stage import LoggingConfig

LOSSES = ("loss", "text_loss", "image_loss")
OPTIONAL_LOSSES = ("align_loss",)
"""Logged as the mean over the window's steps that have them (the semantic alignment: generation steps only)."""


class LogWindow:
    """The steps of one logging window, summed per task, for a record of means as the HF Trainer logs them: ``loss``
    (and text/image) over every step of the window, ``loss/<task>`` over that task's steps — the mixed stage's
    understanding and generation losses differ several-fold — ``tokens_per_s`` over the window's wall time and
    ``tokens_per_s/<task>`` over that task's own step time."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock, self.start = clock, clock()
        self.tasks: dict[str, Counter] = {}  # task → sums of tokens, seconds, steps and each loss

    def add(self, step: dict[str, Any], seconds: float) -> None:
        """One optimizer step's metrics (``task``, ``tokens`` and the losses) and the seconds it took."""
        optional = {k: step[k] for k in OPTIONAL_LOSSES if k in step}
        self.tasks.setdefault(step["task"], Counter()).update(
            {"tokens": step["tokens"], "seconds": seconds, "steps": 1, **{k: step[k] for k in LOSSES}, **optional,
             **{f"steps:{k}": 1 for k in optional}})

    def record(self, reduce: Callable[[float], float] = lambda x: x) -> dict[str, float]:
        """The window's means. ``reduce`` sums a value over the ranks (tokens only: every rank draws the same task
        sequence, so every rank calls it for the same tasks in the same order)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        tasks = sorted(self.tasks.items())
        tokens = {t: reduce(s["tokens"]) for t, s in tasks}
        steps = sum(s["steps"] for _, s in tasks)
        record = {k: sum(s[k] for _, s in tasks) / steps for k in LOSSES}
        for k in OPTIONAL_LOSSES:
            if n := sum(s[f"steps:{k}"] for _, s in tasks):
                record[k] = sum(s[k] for _, s in tasks) / n
        record.update({f"loss/{t}": s["loss"] / s["steps"] for t, s in tasks})
        record["tokens_per_s"] = sum(tokens.values()) / elapsed
        record.update({f"tokens_per_s/{t}": tokens[t] / max(s["seconds"], 1e-9) for t, s in tasks})
        return record


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, output_dir: str | Path, rank: int, total_steps: int, start_step: int,
                 run_config: dict[str, Any] | None = None):
        self.cfg, self.rank = cfg, rank
        self.enabled = rank == 0
        self.out = Path(output_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if cfg.wandb_project:
            import wandb  # an error here names the missing package; install wandb or unset wandb_project

            self._wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(self.out))
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(metrics, step=step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
