"""Data recipes: ``data_recipes/*.yaml`` → :class:`RecipeConfig` (sources, formats, weights, tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unified_mllm.config.base import check

SourceFormat = Literal[
    "llava_json",        # LLaVA-style conversation JSON (list of {id, image, conversations}) + image_root
    "t2i_jsonl",         # text-to-image pairs, one {"caption", "image"} object per line
    "t2i_parquet",       # text-to-image pairs in parquet, a file or a folder of *.parquet (caption column + image
                         # path, bytes or {bytes, path} column)
    "hf_disk",           # a Hugging Face dataset saved with save_to_disk (its "train" split for a DatasetDict);
                         # caption or conversations column + image column (paths or an Image feature)
    "hf_stream",         # a Hugging Face dataset streamed (datasets.load_dataset(..., streaming=True)) from local
                         # data files: one .parquet/.jsonl/.json/.csv/.arrow file or a folder of them
    "text_json",         # text-only conversations (LLaVA-style JSON without images)
]
Task = Literal["understanding", "generation", "text"]


@dataclass
class SourceConfig:
    name: str
    """Short name of the source, used in logs and skip counts."""
    format: SourceFormat
    """Record format of the source."""
    path: str
    """File or directory of the source. Relative paths resolve against the working directory; `${VAR}` and `${VAR:-default}` expand from the environment."""
    task: Task
    """understanding (image → text), generation (text → image) or text (text only)."""
    weight: float = 1.0
    """Relative sampling weight in the interleaved mixture."""
    image_root: str | None = None
    """Directory that image paths in the records are relative to (default: the file's directory)."""
    caption_field: str = "caption"
    """Caption column/key for text-to-image sources."""
    image_field: str = "image"
    """Image column/key (a path, or encoded bytes in parquet / datasets)."""
    max_samples: int | None = None
    """Use at most this many records of the source (null: all)."""

    def __post_init__(self) -> None:
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check(bool(self.name), "name", "must not be empty")


@dataclass
class RecipeConfig:
    sources: list[SourceConfig]
    """The data sources of the mixture."""
    description: str = ""
    """What this recipe is for."""
    online_tokenization: bool = False
    """Run WinTok in the data loader instead of reading the pretokenize cache (slow; for quick experiments)."""
    pretokenize_dir: str | None = None
    """Root of the pretokenize cache; entries live under <root>/<recipe name>/<tokenizer hash>. Null: runs/pretokenized."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "a recipe needs at least one source")
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        check(not dup, "sources", f"duplicate source names: {sorted(dup)}")
