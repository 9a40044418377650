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
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (source {src.name!r} of {where}); fix the path or generate the "
                                f"data (ShapeWorld: python -m unified_mllm.shapeworld --out DIR)")
    n = 0
    for raw in _records(src, path):
        if src.max_samples is not None and n >= src.max_samples:
            return
        n += 1
        rec = {"source": src.name, "task": src.task, "index": n - 1}
        if not isinstance(raw, dict):
            rec["__malformed__"] = f"{path}: record {n - 1} is a {type(raw).__name__}, not an object"
        elif "__malformed__" in raw:
            rec["__malformed__"] = raw["__malformed__"]
        raw = raw if isinstance(raw, dict) else {}
        if "conversations" in raw or src.format in ("llava_json", "text_json"):
            rec["conversations"] = raw.get("conversations")
        if src.format not in ("llava_json", "text_json"):
            rec["caption"] = raw.get(src.caption_field)
        rec["image"] = _image_ref(raw.get(src.image_field), root)
        yield rec


def _image_ref(value, root: Path):
    """A path (made absolute against ``root``), encoded bytes, or None. A ``{"bytes", "path"}`` dict (parquet /
    ``datasets`` Image columns) becomes its bytes when it has them, else its path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if value is not None and not isinstance(value, (str, Path)):
        return None  # a value that is no image reference: the sample builder reports the record as malformed
    return _image_path(value, root)


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
                        yield {"__malformed__": f"{path}:{i + 1}: not valid JSON"}
    elif src.format == "t2i_parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: no *.parquet files in this folder (source {src.name!r})")
        for f in files:
            try:
                table = pq.read_table(f)
            except Exception as e:  # pyarrow raises several error types for a damaged file
                raise ValueError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
            _check_columns(src, f, table.column_names)
            yield from table.to_pylist()
    elif src.format == "hf_disk":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)}); point the "
                                 f"source at one split's directory")
            ds = ds["train"]
        _check_columns(src, path, ds.column_names)
        yield from _rows(_undecoded(ds), path)
    elif src.format == "hf_stream":
        ds = _stream(path)
        if ds.column_names is not None:  # None when the files' schema is not known before reading
            _check_columns(src, path, ds.column_names)
        yield from _rows(_undecoded(ds), path)
    else:
        raise ValueError(f"unknown source format {src.format!r}")


def _check_columns(src: SourceConfig, path: Path, columns: list[str]) -> None:
    """Column formats must hold the configured caption (or conversations) and image columns."""
    text = "conversations" if src.task != "generation" and "conversations" in columns else src.caption_field
    for field_name, column in (("caption_field", text), ("image_field", src.image_field)):
        if column not in columns and not (src.task == "text" and field_name == "image_field"):
            raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(columns)}); set sources.{src.name}."
                             f"{field_name} to the right column")


STREAM_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def _stream(path: Path):
    """A local file, or a folder of data files, as a streamed ``datasets.IterableDataset`` (its ``train`` split).
    Read from local files only: a path that is not on disk never becomes a Hub lookup."""
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in STREAM_BUILDERS and p.is_file())
    else:
        files = [path]
    kinds = {STREAM_BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise ValueError(f"{path}: hf_stream reads one kind of local data file ({', '.join(STREAM_BUILDERS)}); "
                         f"found {sorted(p.suffix for p in files) or 'no data files'}")
    return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=True)


def _rows(ds, path: Path) -> Iterator[dict]:
    """The dataset's rows; a file that ``datasets`` cannot parse (a streamed JSON file with a broken line fails as a
    whole) becomes one error naming the path."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # pyarrow / datasets raise many types for damaged files
            raise ValueError(f"{path}: cannot read the dataset ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                             f"fix or remove the damaged file (t2i_jsonl skips single broken lines)") from None
        yield row


def _undecoded(ds):
    """Image columns as ``{"bytes", "path"}`` dicts: decoding happens once, where the image is used."""
    import datasets

    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds
