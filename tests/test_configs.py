"""Typed stage configs and data recipes: every shipped YAML validates; bad values fail with one clear line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unified_mllm.config import (
    STAGE_CONFIG_CLASSES,
    ConfigError,
    RecipeConfig,
    StageConfig,
    load_config,
    load_recipe,
    load_stage_config,
    read_yaml,
    to_yaml,
)
from unified_mllm.config.base import field_docs

ROOT = Path(__file__).resolve().parents[1]
STAGE_YAMLS = sorted((ROOT / "stage_configs").rglob("*.yaml"))
RECIPE_YAMLS = sorted((ROOT / "data_recipes").rglob("*.yaml"))


def run_train_stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_stage.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("path", STAGE_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stage_yaml_validates(path: Path) -> None:
    data = read_yaml(path)
    stage = data.get("stage", "sft")
    cfg = load_stage_config(stage, path)
    assert cfg.stage == stage
    if isinstance(cfg, StageConfig):  # the recipe a stage names must exist and validate too
        load_recipe(cfg.data.recipe)
    assert (ROOT / cfg.deepspeed.config).is_file(), f"{path}: deepspeed.config {cfg.deepspeed.config} missing"


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.sources


def test_shipped_files_exist() -> None:
    assert {p.stem for p in (ROOT / "stage_configs").glob("*.yaml")} >= {"align", "sft", "t2i", "mixed"}
    assert len(RECIPE_YAMLS) >= 8
    for name in ("zero2", "zero3", "zero3_offload"):
        assert (ROOT / "stage_configs" / "deepspeed" / f"{name}.json").is_file()


def _all_config_classes(cls: type, seen: set[type] | None = None) -> set[type]:
    seen = seen if seen is not None else set()
    seen.add(cls)
    for f in dataclasses.fields(cls):
        for tp in (f.type,) if not isinstance(f.type, str) else ():
            if dataclasses.is_dataclass(tp) and tp not in seen:
                _all_config_classes(tp, seen)
    import typing

    for tp in typing.get_type_hints(cls).values():
        for cand in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(cand) and cand not in seen:
                _all_config_classes(cand, seen)
    return seen


@pytest.mark.parametrize("root", [StageConfig, RecipeConfig, *set(STAGE_CONFIG_CLASSES.values())])
def test_every_field_has_a_docstring(root: type) -> None:
    for cls in _all_config_classes(root):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_wrong_type_exits_with_one_line_naming_the_field() -> None:
    res = run_train_stage("--stage", "sft", "--set", "optim.lr=abc")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "optim.lr" in lines[0] and "sft.yaml" in lines[0] and "Traceback" not in res.stderr


def test_unknown_key_in_file_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stage": "sft", "optim": {"lr": 1e-4, "lrr": 3}}))
    res = run_train_stage("--stage", "sft", "--config", str(bad))
    assert res.returncode != 0
    assert "bad.yaml" in res.stderr and "optim.lrr" in res.stderr and "unknown field" in res.stderr
    assert "Traceback" not in res.stderr


def test_help_lists_fields_with_docs() -> None:
    res = run_train_stage("--help")
    assert res.returncode == 0
    assert "optim.lr" in res.stdout and "Peak learning rate" in res.stdout
    assert "data.cfg.drop_prob" in res.stdout


def test_print_config_round_trips(tmp_path: Path) -> None:
    res = run_train_stage("--stage", "t2i", "--print-config", "--set", "optim.lr=3e-4", "--set", "optim.max_steps=7")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    again = load_config(StageConfig, printed, "printed")
    assert again.optim.lr == pytest.approx(3e-4) and again.optim.max_steps == 7 and again.stage == "t2i"
    assert to_yaml(again) == res.stdout


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ({"optim": {"max_steps": "ten"}}, "optim.max_steps", "integer"),
        ({"optim": {"max_steps": 0}}, "optim.max_steps", "> 0"),
        ({"train": {"llm": "half"}}, "train.llm", "one of"),
        ({"logging": {"jsonl": "yes"}}, "logging.jsonl", "true or false"),
        ({"model": {"llm": {"path": None, "arch": {}}}}, "model.llm.path", "random init"),
        ({"data": {"cfg": {"drop_prob": 1.5}}}, "data.cfg.drop_prob", "[0, 1]"),
        ({"optim": {"task_micro_batch_size": {"generation": 0}}}, "optim.task_micro_batch_size.generation", "> 0"),
        ({"optim": {"task_lr_scale": {"generation": -1.0}}}, "optim.task_lr_scale.generation", "> 0"),
        ({"optim": {"task_min_lr_ratio": {"understanding": 1.5}}}, "optim.task_min_lr_ratio.understanding", "[0, 1]"),
        ({"optim": {"min_lr_ratio": -0.1}}, "optim.min_lr_ratio", "[0, 1]"),
    ],
)
def test_validation_names_the_field(data: dict, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(StageConfig, data, "x.yaml")
    msg = str(err.value)
    assert msg.startswith("x.yaml: ") and field in msg and problem in msg, msg


def test_yaml_scientific_notation_is_a_float() -> None:
    cfg = load_config(StageConfig, yaml.safe_load("optim: {lr: 1e-3}"), "x.yaml")
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_base_inheritance_merges_deeply(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("optim: {lr: 0.5, max_steps: 10}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstage: sft\noptim: {max_steps: 20}\n")
    cfg = load_stage_config("sft", tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.5 and cfg.optim.max_steps == 20


def test_recipe_errors_name_the_source(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"sources": [{"name": "a", "format": "csv", "path": "x", "task": "generation"}]}))
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    assert "sources[0].format" in str(err.value) and "llava_json" in str(err.value)
