"""YAML -> nested dataclasses: type checks naming the key path, the one ``key.path=value`` override
parser, loading and dumping. The config classes live in ``_train_config`` and ``_job_configs``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from robustkit.errors import ConfigError


# -- conversion -------------------------------------------------------------------------
def _check(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{path}.{k}: must be finite, got {v}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{path}: must be finite, got {value}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}; valid keys{' in ' + path if path else ''}: "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    _validate(obj, path)
    return obj


def _validate(obj: Any, path: str) -> None:
    p = f"{path}." if path else ""
    for name in ("epochs", "batch_size", "eval_batch_size"):
        v = getattr(obj, name, None)
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"{p}{name}: must be >= 1, got {v}")
    v = getattr(obj, "lr", None)
    if isinstance(v, float) and v < 0:
        raise ConfigError(f"{p}lr: must be >= 0, got {v}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_path(data, key.strip(), value, what=f"override {item!r}")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any, what: str | None = None) -> None:
    """``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating sections; ``ConfigError`` when a
    parent exists and is not a section (``what`` names the source in the message)."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what or dotted}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] | None, cls: type) -> Any:
    """YAML file (optional) + overrides -> validated dataclass."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
