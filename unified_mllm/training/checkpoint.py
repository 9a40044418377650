"""Atomic, resumable stage checkpoints.

Layout under ``<output_dir>/checkpoints/``::

    step_00000200/             complete checkpoint (a directory only gets this name once everything is written)
      ds/state/...             DeepSpeed engine state: model, optimizer, scheduler (engine.save_checkpoint)
      trainer_rank0.pt         step, data-loader position, RNG states (per rank; plain tensors/lists, weights_only)
      meta.json                step, stage, world size, the resolved config
    step_00000400.partial/     a save in progress (or killed mid-save): never resumed from, removed by the next save

A run killed while saving leaves only a ``.partial`` directory, so it never looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unified_mllm.training.distributed import barrier

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "state"


def _to_safe(obj: Any) -> Any:
    """Make an RNG/data state loadable with ``torch.load(weights_only=True)`` (no numpy objects)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.copy()), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    return obj


def _from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_from_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_from_safe(v) for v in obj]
    return obj


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int, rank: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def save(self, engine, step: int, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
                shutil.rmtree(final)
            partial.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(partial / "ds"), tag=DS_TAG)
        torch.save(_to_safe(trainer_state), partial / f"trainer_rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            meta = {**meta, "step": step, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            if (layout := getattr(engine, "umllm_param_layout", None)) is not None:
                meta["param_layout"] = layout
            (partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            partial.rename(final)  # atomic: the directory is complete from the moment it has its name
            for old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, engine, path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore the engine (model, optimizer, scheduler) and return this rank's trainer state. ``config`` (this
        run's resolved config) names the settings that differ from the checkpoint's when its weights do not fit. A
        checkpoint whose optimizer states were flattened in another parameter order is refused: loaded, each state
        would land on another parameter."""
        now = getattr(engine, "umllm_param_layout", None)
        if now is not None:
            meta = json.loads((path / "meta.json").read_text())
            # written before checkpoints recorded it: Muon's matrices were in DeepSpeed's order, by size
            then = meta.get("param_layout", getattr(engine, "umllm_legacy_param_layout", now))
            if then != now and self.model_differences(path, config):  # another model: say which settings differ
                raise ValueError(self.mismatch_message(path, config, RuntimeError("parameter order")))
            if then != now:
                raise ValueError(
                    f"checkpoint.resume: {path} holds optimizer states flattened in another parameter order than "
                    f"this run's (Muon's matrices are ordered to balance ZeRO's ranks since NOTES.md session 31); "
                    f"loaded, they would land on other parameters. Resume it with the version that wrote it, or start "
                    f"afresh: another checkpoint.output_dir, or --set checkpoint.resume=never")
        try:
            load_path, _ = engine.load_checkpoint(str(path / "ds"), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except RuntimeError as e:  # the state dict does not fit this model (torch's "Missing key(s)…", shapes)
            if "state_dict" not in str(e):
                raise
            raise ValueError(self.mismatch_message(path, config, e)) from e
        if load_path is None:
            raise FileNotFoundError(f"{path}: DeepSpeed state missing or unreadable; delete this checkpoint "
                                    f"directory to resume from an earlier one")
        state_file = path / f"trainer_rank{self.rank}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: missing — the checkpoint was written with another number of "
                                    f"processes; resume with the same world size")
        return _from_safe(torch.load(state_file, map_location="cpu", weights_only=True))

    @staticmethod
    def model_differences(path: Path, config: dict[str, Any] | None) -> list[str]:
        """``key: then → now`` for each model and trainable setting where this run's config differs from the
        checkpoint's."""
        then = json.loads((path / "meta.json").read_text()).get("config", {})
        config = json.loads(json.dumps(config or {}, default=str))  # as meta.json holds it: lists, not tuples
        return [f"{k}: {a!r} → {b!r}" for section in ("model", "train")
                for k, a, b in _differences(then.get(section, {}), config.get(section, {}), section)]

    @staticmethod
    def mismatch_message(path: Path, config: dict[str, Any] | None, error: Exception) -> str:
        """One error for a checkpoint whose weights do not fit this run's model: the model and trainable settings
        that differ (checkpoint → now), and the two ways on."""
        diffs = CheckpointManager.model_differences(path, config)
        detail = next((line.strip() for line in str(error).splitlines()[1:]), str(error))  # torch's first key list
        what = ("; ".join(diffs) + " (checkpoint → this run)") if diffs else f"the model differs ({detail[:300]})"
        return (f"checkpoint.resume: {path} was written by a run with another model: {what}. Set those back to "
                f"resume it, or start afresh: another checkpoint.output_dir, or --set checkpoint.resume=never")


def _differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [(prefix, a, b)]
