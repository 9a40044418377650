"""The evaluation suite's typed config (``eval_configs/*.yaml``): which parts run, on what, with which limits.

Loaded with the project's config loader (unknown keys and wrong types are one-line errors naming the file and
the field). Paths resolve against the working directory; ``${VAR}`` and ``${VAR:-default}`` expand from the
environment, so ``eval_configs/real.yaml`` reads the benchmark locations from variables the user sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unified_mllm.config.base import check, load_config, read_yaml

Split = Literal["heldin", "heldout"]
TaskKind = Literal["pope", "vqa", "mmbench", "mc"]


@dataclass
class SamplingConfig:
    cfg_scale: float = 3.0
    """Classifier-free guidance scale for image generation (1: no unconditional pass)."""
    temperature: float = 1.0
    """Sampling temperature of image tokens (0: greedy)."""
    top_k: int = 0
    """Top-k filter on image-token logits (0: off)."""
    top_p: float = 1.0
    """Nucleus filter on image-token logits (1: off)."""
    seed: int = 0
    """Image j of prompt i is sampled with seed + i·num_images + j."""
    batch_size: int = 16
    """Images per generation batch (conditional and unconditional rows count once)."""

    def __post_init__(self) -> None:
        check(self.cfg_scale >= 0, "cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class LmmsEvalConfig:
    enabled: bool = False
    """Run lmms-eval with the unified_mllm plugin."""
    tasks: list[str] = field(default_factory=list)
    """lmms-eval task names, e.g. [mmbench_en_dev, mmvet, textvqa_val, gqa, pope] (their datasets must be cached for offline runs)."""
    shapeworld_kinds: list[TaskKind] = field(default_factory=list)
    """Local ShapeWorld tasks written from `data` and added to `tasks`: pope (POPE format), vqa (TextVQA format), mmbench (MMBench format, static matching), mc (log-likelihood multiple choice)."""
    shapeworld_splits: list[Split] = field(default_factory=lambda: ["heldin", "heldout"])
    """ShapeWorld splits of the local tasks."""
    include_path: str | None = None
    """Extra folder of task YAMLs (lmms-eval --include_path)."""
    limit: int | None = None
    """Documents per task (lmms-eval --limit; null: all — the only setting for reportable numbers)."""
    batch_size: int = 8
    """Requests per generation batch."""
    max_new_tokens: int | None = None
    """Cap on the tasks' own answer-length limits (null: the tasks' values)."""
    model_class: Literal["auto", "chat", "simple"] = "auto"
    """Plugin class: chat (task messages), simple (context + images; the only one that answers log-likelihood requests). auto: simple when an `mc` task is present."""
    offline: bool = True
    """Set HF_HUB_OFFLINE/HF_DATASETS_OFFLINE for the run (datasets must already be in the cache)."""
    timeout_s: int = 86400
    """Give up on the lmms-eval process after this many seconds."""
    beside: bool = True
    """On a CPU with two or more threads, run lmms-eval's process beside the suite's other parts, each on half the
    threads, instead of before them (the quickstart's eval ~8 s faster on 2 cores, NOTES.md session 28). On CUDA it
    always runs first and alone: one copy of the model on the GPU at a time."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        check(not self.enabled or bool(self.tasks or self.shapeworld_kinds), "tasks",
              "lmms_eval is enabled but lists no tasks and no shapeworld_kinds")
        check(not (self.include_path and self.shapeworld_kinds), "include_path",
              "cannot be combined with shapeworld_kinds (lmms-eval reads one --include_path); write the ShapeWorld "
              "tasks into your folder with `python -m eval.shapeworld_tasks --out FOLDER` and list them in tasks")


@dataclass
class GenEvalConfig:
    enabled: bool = False
    """Generate (and score) the GenEval image layout."""
    metadata: str | None = None
    """GenEval's evaluation_metadata.jsonl. Null: ShapeWorld's geneval_<shapeworld_split>.jsonl under `data`."""
    shapeworld_split: Split = "heldin"
    """ShapeWorld prompt split used when `metadata` is null."""
    num_images: int = 4
    """Images per prompt (GenEval: 4)."""
    max_prompts: int | None = None
    """Only the first N prompts (null: all 553)."""
    scorer: Literal["auto", "official", "shapeworld", "none"] = "auto"
    """official: GenEval's evaluate_images.py; shapeworld: the ShapeWorld judge; auto: official when geneval_repo is set, else the judge for ShapeWorld prompts, else none."""
    geneval_repo: str | None = None
    """A djghosh13/geneval checkout (the official scorer)."""
    detector_path: str | None = None
    """Folder holding GenEval's Mask2Former checkpoint (evaluate_images.py --model-path)."""
    scorer_python: str | None = None
    """Python of the environment where GenEval's scorer is installed (null: this one)."""

    def __post_init__(self) -> None:
        check(self.num_images >= 1, "num_images", f"must be >= 1, got {self.num_images}")
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1 or null")
        check(self.scorer != "official" or bool(self.geneval_repo and self.detector_path), "scorer",
              "official needs geneval_repo and detector_path")


@dataclass
class DPGConfig:
    enabled: bool = False
    """Generate (and score) the DPG-Bench grid layout."""
    prompts: str | None = None
    """DPG-Bench's prompts folder (<item_id>.txt). Null: ShapeWorld prompts (geneval_<shapeworld_split>.jsonl), judged per cell."""
    shapeworld_split: Split = "heldin"
    """ShapeWorld prompt split used when `prompts` is null."""
    max_prompts: int | None = None
    """Only the first N prompts (null: all 1065)."""
    ella_repo: str | None = None
    """A TencentQQGYLab/ELLA checkout: runs dpg_bench/compute_dpg_bench.py (mPLUG) on the grids."""
    csv: str | None = None
    """dpg_bench.csv (null: ella_repo/dpg_bench/dpg_bench.csv)."""
    scorer_python: str | None = None
    """Python of the environment where the mPLUG scorer is installed (null: this one)."""

    def __post_init__(self) -> None:
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1 or null")


@dataclass
class ShapeWorldBenchConfig:
    enabled: bool = False
    """Run the ShapeWorld bench (understanding and generation accuracy per category)."""
    splits: list[Split] = field(default_factory=lambda: ["heldin", "heldout"])
    """Splits to score."""
    max_questions: int | None = None
    """Understanding questions per split (null: all)."""
    max_prompts: int | None = None
    """Generation prompts per split (null: all)."""
    num_images: int = 1
    """Images per generation prompt."""
    max_new_tokens: int = 16
    """Answer length limit."""
    answer_batch_size: int = 32
    """Questions per answering batch."""

    def __post_init__(self) -> None:
        check(len(self.splits) > 0, "splits", "needs at least one split")
        check(self.num_images >= 1, "num_images", f"must be >= 1, got {self.num_images}")


@dataclass
class GroundingConfig:
    enabled: bool = False
    """Run the question-grounding check (eval.grounding): answers that must change with the question's words."""
    split: Split = "heldin"
    """Split whose scenes are asked about."""
    max_scenes: int = 150
    """Scenes of two or more objects to ask about."""

    def __post_init__(self) -> None:
        check(self.max_scenes >= 1, "max_scenes", f"must be >= 1, got {self.max_scenes}")


@dataclass
class SuiteConfig:
    description: str = ""
    """What this suite is for."""
    data: str | None = None
    """ShapeWorld data directory (python -m unified_mllm.shapeworld --out DIR): for the ShapeWorld bench, the local lmms-eval tasks and ShapeWorld prompts."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Image sampling settings shared by the generation parts."""
    shapeworld: ShapeWorldBenchConfig = field(default_factory=ShapeWorldBenchConfig)
    """The ShapeWorld bench."""
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    """Whether answers follow the question's words (ShapeWorld scenes)."""
    lmms_eval: LmmsEvalConfig = field(default_factory=LmmsEvalConfig)
    """Understanding benchmarks through lmms-eval."""
    geneval: GenEvalConfig = field(default_factory=GenEvalConfig)
    """GenEval layout and scorer."""
    dpg: DPGConfig = field(default_factory=DPGConfig)
    """DPG-Bench layout and scorer."""
    grid_samples: int = 16
    """Generated samples shown in samples.png (0: no grid)."""

    def __post_init__(self) -> None:
        needs_data = [name for name, on in (
            ("shapeworld.enabled", self.shapeworld.enabled),
            ("lmms_eval.shapeworld_kinds", self.lmms_eval.enabled and bool(self.lmms_eval.shapeworld_kinds)),
            ("geneval.metadata", self.geneval.enabled and self.geneval.metadata is None),
            ("dpg.prompts", self.dpg.enabled and self.dpg.prompts is None)) if on]
        check(self.data is not None or not needs_data, needs_data[0] if needs_data else "data",
              "needs the ShapeWorld directory `data` (or give this part its own files)")
        check(any((self.shapeworld.enabled, self.lmms_eval.enabled, self.geneval.enabled, self.dpg.enabled)),
              "enabled", "no part is enabled (shapeworld, lmms_eval, geneval, dpg)")


PATH_FIELDS = ("data", "lmms_eval.include_path", "geneval.metadata", "geneval.geneval_repo", "geneval.detector_path",
               "geneval.scorer_python", "dpg.prompts", "dpg.ella_repo", "dpg.csv", "dpg.scorer_python")


def load_suite_config(path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    """Read, override (``a.b=value``), expand ``${VAR}`` in the path fields, and validate."""
    from unified_mllm.config.base import ConfigError, apply_overrides
    from unified_mllm.data.sources import expand

    data = apply_overrides(read_yaml(path), overrides or [])
    source = str(path) + (" (with --set)" if overrides else "")
    for dotted in PATH_FIELDS:
        node, *rest = dotted.split(".")
        holder = data if not rest else data.get(node)
        key = rest[0] if rest else node
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            try:
                holder[key] = expand(holder[key], f"{source}: {dotted}") or None  # "${VAR:-}" unset → null
            except ValueError as e:
                raise ConfigError(source, dotted, str(e).rsplit(": ", 1)[-1]) from None
    return load_config(SuiteConfig, data, source)
