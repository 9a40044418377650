"""Fill a shipped DeepSpeed JSON (``stage_configs/deepspeed/*.json``) from the stage config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from unified_mllm.config import PROJECT_ROOT, ConfigError
from unified_mllm.config.stage import DeepSpeedSection, OptimConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there a bf16 matmul of the
    ShapeWorld model's shapes runs ~2.4x an fp32 one (NOTES.md, session 24); without it bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(section: DeepSpeedSection, cpu_autocast: bool = True) -> str:
    """'bf16', 'bf16_autocast' or 'fp32'. auto: bf16 on a CUDA device that supports it; bf16_autocast on a CPU with
    native bf16 matmuls (the mixed stage's step 1.14-1.27x faster, its loss equal to 1e-5 at step 120: NOTES.md,
    session 24, `scripts/bench/precision.py`) unless the stage opts out with ``cpu_autocast=False``; fp32 elsewhere.
    On CPU, DeepSpeed's whole-model bf16 runs but is no faster than fp32 (session 23); allowed on request."""
    if section.precision != "auto":
        return section.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16_autocast" if cpu_autocast and cpu_has_native_bf16() else "fp32"


def computes_in_bf16(ds_config: dict[str, Any]) -> bool:
    """Whether a config from :func:`build_ds_config` runs the forward in bf16 (DeepSpeed's bf16 or torch_autocast)."""
    return any(ds_config.get(key, {}).get("enabled") is True for key in ("bf16", "torch_autocast"))


def load_ds_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = PROJECT_ROOT / p
    if not p.is_file():
        raise ConfigError("deepspeed.config", path, "DeepSpeed JSON not found (shipped: stage_configs/deepspeed/"
                          "zero2.json, zero3.json, zero3_offload.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(str(p), "deepspeed.config", f"invalid JSON: {e}") from None


def _fill(value: Any, auto: Any) -> Any:
    return auto if value == "auto" else value


def build_ds_config(section: DeepSpeedSection, optim: OptimConfig, world_size: int,
                    precision: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict with every "auto" replaced by the stage config's value. ``precision``: the trainer's
    resolved precision (:func:`resolve_precision`), so the config and the trainer cannot disagree; None resolves
    ``section``'s here."""
    cfg = copy.deepcopy(load_ds_json(section.config))
    cfg["train_micro_batch_size_per_gpu"] = _fill(cfg.get("train_micro_batch_size_per_gpu", "auto"),
                                                  optim.micro_batch_size)
    cfg["gradient_accumulation_steps"] = _fill(cfg.get("gradient_accumulation_steps", "auto"), optim.grad_accum)
    cfg["train_batch_size"] = (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
                               * world_size)
    cfg["gradient_clipping"] = _fill(cfg.get("gradient_clipping", "auto"), optim.grad_clip)
    precision = precision or resolve_precision(section)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg.pop("fp16", None)
    cfg.pop("torch_autocast", None)
    if precision == "bf16_autocast":
        comm = cfg.get("communication_data_type")  # DeepSpeed's default, null, leaves the dtype to the parameters
        if comm is not None and str(comm).lower() != "fp32":
            # ZeRO under torch autocast reduces each parameter's gradient in that parameter's dtype (fp32 here): the
            # key would be ignored without a word, and the run would not reduce in the dtype its JSON names (NOTES.md,
            # session 28)
            raise ConfigError(section.config, "communication_data_type", f"{comm!r} is ignored by DeepSpeed under "
                              "deepspeed.precision bf16_autocast (gradients reduce in fp32); remove it, or set "
                              "deepspeed.precision: bf16")
        # No lower-precision modules: DeepSpeed would otherwise reduce nn.Linear gradients in bf16; kept in fp32, they
        # are averaged exactly and reach Muon's fp32 Newton-Schulz as they are.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if optim.optimizer == "muon":
        # ZeRO clips after Muon has written its orthogonalised update into the gradient, so a clip would shrink every
        # Muon step by the update's norm (~1/40 on the ShapeWorld WinTok) — measured, NOTES.md session 17. Muon's
        # update has a fixed size by construction and AdamW's is normalised, so the run goes unclipped.
        cfg["gradient_clipping"] = 0.0
        if zero_stage(cfg) == 3:
            # DeepSpeed's ZeRO-3 refuses Muon with reduce-scatter ("Muon and reduce scatter cannot be used together")
            zero["reduce_scatter"] = False
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload and optim.optimizer != "adamw":
        raise ValueError(f"optim.optimizer: {optim.optimizer} runs without ZeRO-Offload; {section.config} offloads the "
                         f"optimizer — use adamw, or a DeepSpeed config without offload_optimizer")
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeedCPUAdam (compiled once, cached).
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}}
    else:
        cfg.pop("optimizer", None)
        cfg["zero_allow_untested_optimizer"] = True
    cfg.pop("scheduler", None)  # the stage's warm-up + cosine schedule is passed as a client scheduler
    return cfg


def uses_config_optimizer(ds_cfg: dict[str, Any]) -> bool:
    return "optimizer" in ds_cfg


def zero_stage(ds_cfg: dict[str, Any]) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
