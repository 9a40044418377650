"""Typed configs: stage trees and data recipes, loaded from YAML with errors that name the field."""

from __future__ import annotations

from pathlib import Path

from unified_mllm.config.base import (
    ConfigError,
    apply_overrides,
    describe_fields,
    load_config,
    read_yaml,
    to_dict,
    to_yaml,
)
from unified_mllm.config.recipe import RecipeConfig, SourceConfig
from unified_mllm.config.stage import STAGES, StageConfig
from unified_mllm.config.tokenizer_stage import TokenizerStageConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STAGE_CONFIG_DIR = PROJECT_ROOT / "stage_configs"
RECIPE_DIR = PROJECT_ROOT / "data_recipes"

# stage name → config class
STAGE_CONFIG_CLASSES: dict[str, type] = {"tokenizer": TokenizerStageConfig, **{name: StageConfig for name in STAGES}}


def default_stage_file(stage: str) -> Path:
    return STAGE_CONFIG_DIR / f"{stage}.yaml"


def load_stage_config(stage: str, config_file: str | Path | None = None, overrides: list[str] | None = None):
    """Resolve a stage's config: ``config_file`` (default ``stage_configs/<stage>.yaml``) + ``--set`` overrides."""
    if stage not in STAGE_CONFIG_CLASSES:
        raise ConfigError("--stage", stage, f"unknown stage (valid: {', '.join(STAGE_CONFIG_CLASSES)})")
    path = Path(config_file) if config_file else default_stage_file(stage)
    data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    data.setdefault("stage", stage)
    if data["stage"] != stage:
        raise ConfigError(str(path), "stage", f"the file is for stage {data['stage']!r}, not {stage!r}")
    source = display_path(path) + (" (with --set)" if overrides else "")
    return load_config(STAGE_CONFIG_CLASSES[stage], data, source)


def display_path(path: str | Path) -> str:
    """A path as a user would type it: relative to the working directory when it is below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_recipe(path: str | Path) -> RecipeConfig:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    return load_config(RecipeConfig, read_yaml(path), display_path(path))


__all__ = [
    "ConfigError", "StageConfig", "RecipeConfig", "SourceConfig", "STAGES", "STAGE_CONFIG_CLASSES",
    "load_stage_config", "load_recipe", "load_config", "read_yaml", "apply_overrides", "describe_fields",
    "to_dict", "to_yaml", "PROJECT_ROOT",
]
