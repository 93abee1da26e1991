"""One typed config tree: YAML -> dataclasses, validated once, every error reported with its key path.

Each config dataclass declares its fields with types; ``validate(self) -> list[str]`` methods may add
semantic checks (messages relative to the object). :func:`load` collects *all* errors before raising
:class:`ConfigError`, e.g. ``fleet.rounds: must be > 0, got -3``. One bad value is one error: an object holding a
value of the wrong type (anywhere below it) is not checked, as its checks would see the placeholder put in its
place (``devices: 0`` for ``devices: ten``). No globals, no environment variables.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000_000, "mib": 1024 * 1024}


class ConfigError(ValueError):
    """All problems found in one config, one per line with its key path."""

    def __init__(self, errors: list[str], source: str = ""):
        self.errors = errors
        head = f"invalid config {source}:" if source else "invalid config:"
        super().__init__("\n  ".join([head, *errors]))


def parse_size(value: Any) -> int:
    """``256KB`` -> 256000, ``320KiB`` -> 327680, ``1MB`` -> 1000000, ints pass through (bytes).

    KB is 1000 bytes, as in the paper's figures; KiB is 1024.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 256KB, got {value!r}")  # noqa: TRY004 (config errors: ValueError)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 256KB or 320KiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


class Size(int):
    """A byte count that YAML may write as ``256KB`` / ``320KiB``."""


class _Errors(list):
    """The errors found so far; ``wrong_type`` counts values that were replaced by a placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.wrong_type = 0

    def type_error(self, message: str) -> None:
        self.append(message)
        self.wrong_type += 1


def _convert(tp: Any, value: Any, path: str, errors: _Errors) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errors) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.type_error(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, path, errors)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.type_error(f"{path}: expected a list, got {value!r}")
            return []
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.type_error(f"{path}: expected a mapping, got {value!r}")
            return {}
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _convert(vt, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Size:
        try:
            return Size(parse_size(value))
        except ValueError as e:
            errors.type_error(f"{path}: {e}")
            return Size(0)
    if tp is bool:
        if not isinstance(value, bool):
            errors.type_error(f"{path}: expected true/false, got {value!r}")
        return bool(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.type_error(f"{path}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.type_error(f"{path}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.type_error(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict, path: str, errors: _Errors) -> T:
    hints = typing.get_type_hints(cls)
    wrong_before = errors.wrong_type
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{_join(path, str(key))}: unknown key (expected one of {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        p = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], p, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{p}: required")
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # type: ignore[return-value]  # missing keys already reported
    check = getattr(obj, "validate", None)
    if check is not None and errors.wrong_type == wrong_before:
        errors.extend(f"{_join(path, msg)}" if not msg.startswith(":") else f"{path}{msg}" for msg in check())
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def from_dict(cls: type[T], data: dict, source: str = "", prefix: str = "") -> T:
    """Build ``cls`` from a mapping; raise :class:`ConfigError` listing every problem."""
    errors = _Errors()
    if not isinstance(data, dict):
        raise ConfigError([f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}"], source)
    obj = _build(cls, data, prefix, errors)
    if errors:
        raise ConfigError(list(errors), source)
    return obj


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a missing or unreadable file is a :class:`ConfigError`."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read: {e}"], str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML syntax: {e}"], str(path)) from None


def load(cls: type[T], path: str | Path) -> T:
    """Load a YAML file into ``cls`` (see :func:`from_dict`)."""
    return from_dict(cls, read_yaml(path), str(path))


@dataclasses.dataclass
class BoardConfig:
    """A target board's budgets (configs/boards/*.yaml)."""

    name: str
    cpu: str = "cortex-m7"
    sram: Size = Size(320 * 1024)  # noqa: RUF009 (an int: immutable)
    flash: Size = Size(1024 * 1024)  # noqa: RUF009
    budget: Size | None = None  # training budget for the plan (defaults to sram)
    qemu_machine: str | None = None

    def validate(self) -> list[str]:
        errs = []
        if self.sram <= 0:
            errs.append(f"sram: must be > 0, got {self.sram}")
        if self.budget is not None and self.budget > self.sram:
            errs.append(f"budget: {self.budget} bytes exceeds sram {self.sram}")
        return errs

    @property
    def training_budget(self) -> int:
        return int(self.budget if self.budget is not None else self.sram)
