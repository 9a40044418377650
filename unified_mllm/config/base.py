"""Typed dataclass configs loaded from YAML, validated with errors that name the file and the field.

A config class is a plain ``@dataclass`` whose fields carry a docstring on the line below them (read from
the source with :mod:`ast`, so ``--help`` and reviewers read the same words). ``load_config`` turns a
mapping into an instance, rejecting unknown keys and wrongly typed values with a :class:`ConfigError`
whose message is one line: ``FILE: field.path: what is wrong``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type. The message is one line naming the field."""

    def __init__(self, source: str, field_path: str, problem: str):
        self.source, self.field_path, self.problem = source, field_path, problem
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field_path or '<root>'}: {problem}")


# ----------------------------------------------------------------------------------------------- docs
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flattened (dotted name, type name, default, doc) for every leaf field of a config tree."""
    rows: list[tuple[str, str, Any, str]] = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        sub = _dataclass_in(tp)
        if sub is not None:
            rows.append((name, sub.__name__, None, docs.get(f.name, "")))
            rows.extend(describe_fields(sub, name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        rows.append((name, type_name(tp), default, docs.get(f.name, "")))
    return rows


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if get_origin(tp) in (Union, types.UnionType):
        subs = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if len(subs) == 1:
            return subs[0]
    return None


# ----------------------------------------------------------------------------------------- conversion
def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(source, path, f"must not be null (expected {type_name(tp)})")
        for arg in args:  # an exact primitive match wins (10000.0 stays a float in `int | float`)
            if arg in (bool, int, float, str) and type(value) is arg:
                return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, source)
            except ConfigError as e:
                errors.append(e.problem)
        raise ConfigError(source, path, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(source, path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(source, path, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path, source)  # type: ignore[arg-type]
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, path, f"expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, path, f"expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(source, path, f"expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(source, path, f"expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path, source): _convert(v, val_tp, f"{path}.{k}", source)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(source, path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(source, path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(source, path, f"expected a string, got {value!r}")
    raise ConfigError(source, path, f"unsupported field type {type_name(tp)}")


def _build(cls: type[T], data: Mapping[str, Any], path: str, source: str) -> T:
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else str(key)
        raise ConfigError(source, where, f"unknown field (valid: {', '.join(sorted(names))})")
    hints = _hints(cls)
    kwargs = {}
    for name, f in names.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(source, where, "required field is missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(source, f"{path}.{e.field_path}" if path and e.field_path else (e.field_path or path),
                          e.problem) from None
    return obj


def load_config(cls: type[T], data: Mapping[str, Any] | None, source: str = "") -> T:
    """Build config ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    return _build(cls, data or {}, "", source)


# ------------------------------------------------------------------------------------------ YAML I/O
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a key ``base: OTHER.yaml`` (relative to the file) is loaded first and deep-merged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), "", f"invalid YAML{line}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "the file must hold a mapping of fields")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(read_yaml(path.parent / base), data)
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) onto a nested mapping."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, item, "expected KEY=VALUE, e.g. optim.lr=2e-5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def check(condition: bool, field_name: str, problem: str) -> None:
    """For ``__post_init__``: raise a ConfigError naming ``field_name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError("", field_name, problem)
