"""Building a validated `Config`: defaults <- YAML preset <- dotted overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mmalign.config.fields import ConfigError
from mmalign.config.sections import Config

# The embedded default every pipeline runs when no --config is given.
EMBEDDED_PRESET = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "shapes-cpu.yaml"


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, naming the field on failure."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: optional fields are not supported")  # keep types plain
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            # inf/nan pass every `>= 0` style check (nan fails none), so refuse them here
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
            return tuple(_coerce(v, item, name) for v in value)
    except (TypeError, ValueError):
        tname = "finite float" if typ is float else getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{name}: expected {tname}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported field type {typ}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys fail naming the dotted field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown field (known: {sorted(known)})")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, name)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, typ, name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted = 'a.b' (creating sub-dicts)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML preset from a local path or s3:// URI."""
    from mmalign import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping")
    return data


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML preset <- dotted overrides, validated."""
    data = load_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    cfg: Config = from_dict(Config, data)
    return cfg.validate()
