"""Readers for the recipe's source formats → plain records.

A record is a dict: ``source``, ``task``, ``image`` (absolute path or None), and ``conversations`` (LLaVA style,
for understanding/text) or ``caption`` (for text-to-image and caption-style understanding).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from unified_mllm.config.recipe import SourceConfig

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(path: str, where: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment; an unset variable without default is an error."""
    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise ValueError(f"{where}: environment variable {m.group(1)} is not set (export it or give a default)")
        return value

    return _VAR.sub(sub, path)


def _image_path(value, root: Path) -> str | None:
    if not value:
        return None
    p = Path(value)
    return str(p if p.is_absolute() else root / p)


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def read_source(src: SourceConfig, where: str = "recipe") -> Iterator[dict]:
    path = Path(expand(src.path, f"{where}: sources.{src.name}.path"))
    root = Path(expand(src.image_root, f"{where}: sources.{src.name}.image_root")) if src.image_root else path.parent
    if src.format not in ("hf_stream",) and not path.exists():
        raise FileNotFoundError(f"{path}: not found (source {src.name!r} of {where}); fix the path or generate the "
                                f"data (ShapeWorld: python -m unified_mllm.shapeworld --out DIR)")
    n = 0
    for raw in _records(src, path):
        if src.max_samples is not None and n >= src.max_samples:
            return
        n += 1
        rec = {"source": src.name, "task": src.task, "index": n - 1}
        if isinstance(raw, dict) and "__malformed__" in raw:
            rec["__malformed__"] = raw["__malformed__"]
        if src.format in ("llava_json", "text_json"):
            rec["conversations"] = raw.get("conversations") if isinstance(raw, dict) else None
            rec["image"] = _image_path(raw.get("image"), root) if isinstance(raw, dict) else None
        else:
            rec["caption"] = raw.get(src.caption_field) if isinstance(raw, dict) else None
            img = raw.get(src.image_field) if isinstance(raw, dict) else None
            rec["image"] = img if isinstance(img, (bytes, dict)) else _image_path(img, root)
        yield rec


def _records(src: SourceConfig, path: Path) -> Iterator:
    if src.format in ("llava_json", "text_json"):
        yield from _read_json_list(path)
    elif src.format == "t2i_jsonl":
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {"__malformed__": f"{path}:{i + 1}"}
    elif src.format == "t2i_parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        for f in files:
            yield from pq.read_table(f).to_pylist()
    elif src.format == "hf_disk":
        import datasets

        yield from datasets.load_from_disk(str(path))
    elif src.format == "hf_stream":
        import datasets

        yield from datasets.load_dataset(str(path), split="train", streaming=True)
    else:
        raise ValueError(f"unknown source format {src.format!r}")
