"""WinTok checkpoint I/O: the released ``.pth`` container, bare state dicts, safetensors, save_pretrained dirs.

Loading is strict (missing, unexpected and mis-shaped keys are listed) and safe: ``torch.load`` always runs with
``weights_only=True``; the released container's pickled ``args`` object (an ``argparse.Namespace``) is admitted
through an explicit allow-list, and anything else that would need arbitrary unpickling is refused, never run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tokenizer.config import WinTokConfig
from tokenizer.model import WinTok

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ALLOWED_GLOBALS = [argparse.Namespace]
"""Classes the released container may pickle besides tensors and containers."""


class WinTokLoadError(ValueError):
    """A WinTok checkpoint could not be loaded; the message names the file and what to do."""


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … (+{len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------ reading
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The WinTok weights of a file: released container (``trainer.unitok``), bare state dict, or safetensors."""
    path = Path(path)
    if not path.exists():
        raise WinTokLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_state_dict(path / WEIGHTS_NAME)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise WinTokLoadError(f"{path}: not a readable safetensors file ({e}); re-download or re-convert it") from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WinTokLoadError(
            f"{path}: refused — the file needs objects outside the safe allow-list to load "
            f"({str(e).splitlines()[0][:200]}); it was not executed. If you trust the file, convert it once "
            f"with your own code to safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise WinTokLoadError(f"{path}: unreadable or truncated checkpoint ({str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict) and "unitok" in obj["trainer"]:
        obj = obj["trainer"]["unitok"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WinTokLoadError(f"{path}: no WinTok state dict found (expected the released container with "
                              f"trainer.unitok, or a dict of tensors)")
    return obj


# ---------------------------------------------------------------------------------------- inference
def infer_config(sd: dict[str, torch.Tensor], **overrides: Any) -> WinTokConfig:
    """Every size the tensor shapes determine; head counts and eps from released defaults or ``overrides``."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise WinTokLoadError(f"missing key {key!r}: this is not a WinTok state dict")
        return tuple(sd[key].shape)

    def count_layers(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
        return max(ids) + 1 if ids else 0

    hidden, _, patch, _ = shape("encoder.vision_model.embeddings.patch_embedding.weight")
    num_positions = shape("encoder.vision_model.embeddings.position_embedding.weight")[0]
    grid = int(round(num_positions**0.5))
    num_codebooks = count_layers("quantizer.codebooks.")
    codebook_size, codebook_dim = shape("quantizer.codebooks.0.codebook.weight")
    dec_hidden = shape("decoder.vision_model.post_layernorm.weight")[0]
    values: dict[str, Any] = dict(
        image_size=grid * patch, patch_size=patch, hidden_size=hidden,
        num_layers=count_layers("encoder.vision_model.encoder.layers."),
        mlp_dim=shape("encoder.vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_semantic_tokens=shape("query_tokens")[0], semantic_dim=shape("projection.weight")[0],
        num_codebooks=num_codebooks, codebook_size=codebook_size, codebook_dim=codebook_dim,
        proj_heads=num_codebooks, decoder_hidden_size=dec_hidden,
        decoder_num_layers=count_layers("decoder.vision_model.encoder.layers."),
        decoder_mlp_dim=shape("decoder.vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        refine_channels=shape("refine.net.0.weight")[0] if "refine.net.0.weight" in sd else 0)
    released = WinTokConfig()
    values.setdefault("num_heads", released.num_heads if hidden % released.num_heads == 0 else 1)
    values.setdefault("decoder_num_heads", released.decoder_num_heads if dec_hidden % released.decoder_num_heads == 0 else 1)
    values.update(overrides)
    try:
        return WinTokConfig(**values)
    except (TypeError, ValueError) as e:
        raise WinTokLoadError(f"inferred config is invalid ({e}); pass the missing sizes as keyword overrides") from None


def load_state_strict(model: WinTok, sd: dict[str, torch.Tensor], source: str) -> WinTok:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k} {tuple(sd[k].shape)} vs expected {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched, 5)}")
    if problems:
        raise WinTokLoadError(f"{source}: not a matching WinTok checkpoint — " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model


def load_checkpoint(path: str | Path, **overrides: Any) -> WinTok:
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_pretrained(path, **overrides)
    sd = read_state_dict(path)
    config = infer_config(sd, **overrides)
    return load_state_strict(WinTok(config), sd, str(path)).eval()


# --------------------------------------------------------------------------------- save_pretrained
def save_pretrained(model: WinTok, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_NAME)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": "wintok"})


def load_pretrained(directory: str | Path, **overrides: Any) -> WinTok:
    directory = Path(directory)
    cfg_file = directory / CONFIG_NAME
    if not cfg_file.is_file():
        raise WinTokLoadError(f"{directory}: no {CONFIG_NAME}; is this a WinTok save_pretrained directory? "
                              f"(convert a released .pth with `python -m tokenizer.convert IN.pth {directory}`)")
    try:
        data = json.loads(cfg_file.read_text())
        data.pop("model_type", None)
        data.update(overrides)
        config = WinTokConfig.from_dict(data)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise WinTokLoadError(f"{cfg_file}: invalid WinTok config ({e})") from None
    sd = read_state_dict(directory / WEIGHTS_NAME)
    return load_state_strict(WinTok(config), sd, str(directory)).eval()


def identity_hash(model: WinTok) -> str:
    """A short hash of what makes two WinToks encode alike: the weights and the config fields that differ from their
    defaults. Fields at their default are left out, so a new optional field (added at a default that keeps the old
    behaviour) does not orphan every pretokenize cache keyed by the old hash; ``extra`` holds notes, not identity."""
    defaults = type(model.config)().to_dict()
    config = {k: v for k, v in model.config.to_dict().items() if k != "extra" and v != defaults.get(k)}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
