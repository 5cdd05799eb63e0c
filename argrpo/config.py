"""Dataclass configs from YAML plus ``--set key=value`` overrides, with errors that name the file and the key.

Config classes are plain dataclasses (TRL style): ``field(default=..., metadata={"help": ...})``, checks in
``__post_init__``, nested dataclasses for sections. This module only loads, validates types and documents them.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from argrpo.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config problem; the message names the file and the dotted key."""


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str | None):
    """Check ``value`` against the annotation ``tp``; convert where YAML is looser (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{_where(source, key)}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{_where(source, key)}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, key)}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(source, key)}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept any spelling float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{_where(source, key)}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        full = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"{_where(source, full)}: unknown key; valid keys{' of ' + prefix if prefix else ''}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source or cls.__name__}{' [' + prefix + ']' if prefix else ''}: {e}") from e


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"grpo.beta=0.04"`` -> (["grpo", "beta"], 0.04); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key.split("."), parse_value(raw)


def parse_value(raw: str) -> Any:
    """A command-line value as YAML, except that numbers like ``1e-5`` (a string to YAML 1.1) become floats."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


_INDEXED = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<index>-?\d+)\]$")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=v`` in the nested dict; ``rewards[0].weight=2`` indexes a list the config already has."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            m = _INDEXED.match(part)
            if m:
                seq = node.get(m["key"]) if isinstance(node, dict) else None
                idx = int(m["index"])
                if not isinstance(seq, list) or not -len(seq) <= idx < len(seq):
                    n = len(seq) if isinstance(seq, list) else 0
                    raise ConfigError(f"--set {item!r}: {m['key']!r} has no item {idx} (it has {n})")
                if last:
                    seq[idx] = value
                    continue
                node = seq[idx]
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {item!r}: {part!r} is not a section")
                continue
            if last:
                node[part] = value
                continue
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = nxt
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + ``key=value`` overrides -> validated dataclass ``cls``."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "--set"
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, source=source)


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def describe(cls, prefix: str = "") -> str:
    """Self-documentation: one line per key with its type, default and help text."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip().splitlines()
            lines.append(f"{key}:  # {doc[0] if doc else tp.__name__}")
            lines.append(describe(tp, prefix=key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        help_ = f.metadata.get("help", "")
        lines.append(f"{key} ({_type_name(tp)}, default {default!r}): {help_}")
    return "\n".join(lines)


def require_at_least(cfg, prefix: str = "", **bounds: float) -> None:
    """In a config's ``__post_init__``: raise ``ValueError`` naming the first field below its lower bound,
    e.g. ``require_at_least(self, "logging.", image_every=0, image_prompts=1)``."""
    for name, low in bounds.items():
        value = getattr(cfg, name)
        if value < low:
            raise ValueError(f"{prefix}{name} must be >= {low}, got {value!r}")
