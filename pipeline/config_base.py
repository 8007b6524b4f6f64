"""The machinery of the typed run config: a key's default, help and rules (:func:`_key`), the
section base class that checks every key on construction (:class:`_Section`), and building a
section from config data (:func:`_build`). :mod:`pipeline.config` defines the sections with it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import MISSING, field, fields
from typing import Any, Callable

from sources.errors import ConfigError
from sources.yamlfile import short

__all__: list[str] = []  # private to the config modules

def _key(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **rules: Any) -> Any:
    """A config key: its default, its one-line meaning and how it is checked.

    ``rules``: ``choices`` (allowed values) with ``expected`` (how the error says them);
    ``minimum`` (``"positive"`` or ``"non-negative"``); ``types`` (accepted types of a key whose
    default is ``None``); ``loose`` (checked only by its section's ``_check``); ``build`` (builds
    the value from the config data: nested sections, spans); ``example`` (printed instead of the
    default by ``python -m pipeline config``)."""
    meta = {"help": help, **rules}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true/false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, (list, tuple)):
        return "a list"
    return "a mapping" if isinstance(default, Mapping) else "a string"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same(value: Any, choice: Any) -> bool:
    """``value == choice`` where ``1`` is not ``True``."""
    return type(value) is type(choice) and value == choice


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': expected a {'non-negative' if allow_zero else 'positive'} number, got {short(value)}")


def _number(value: Any, key: str, integer: bool = False) -> float | int:
    if not _is_number(value):
        finite = "" if isinstance(value, bool) or not isinstance(value, (int, float)) else "finite "
        raise ConfigError(f"config key '{key}': expected a {finite}number, got {short(value)}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"config key '{key}': expected an integer, got {short(value)}")
    return value if integer else float(value)


def _checked(value: Any, f: dataclasses.Field, key: str) -> Any:
    """``value`` of key ``f`` checked against its rules and its default's type, normalised (float
    keys hold floats, lists are tuples)."""
    meta, default = f.metadata, _default(f)
    if meta.get("loose") or isinstance(value, _Section):
        return value
    expected = meta.get("expected")
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"config key '{key}': expected {expected or _kind(default)}, got null "
                          "(leave the key out for its default)")
    if "choices" in meta:
        if not any(_same(value, c) for c in meta["choices"]):
            raise ConfigError(f"config key '{key}': expected {expected}, got {short(value)}")
        return value
    if default is None:
        types = meta["types"]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"config key '{key}': expected {types[0].__name__}, got {short(value)}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {short(value)}")
        return value
    if isinstance(default, (int, float)):
        value = _number(value, key, integer=isinstance(default, int))
        if "minimum" in meta:
            _positive(value, key, allow_zero=meta["minimum"] == "non-negative")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {short(value)}")
        return tuple(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected a string, got {short(value)}")
    return str(value)


class _Section:
    """Base of every section: checks each key on construction (so a section built in code is
    checked as one read from a file), then the section's own rules (``_check``)."""

    _path = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _checked(getattr(self, f.name), f, self._key(f.name))
            object.__setattr__(self, f.name, value)
        self._check()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _check(self) -> None:
        """Rules across keys, or beyond the key's type; raise ConfigError naming the key."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, given: Any, path: str) -> Any:
    """The section ``cls`` from config data: unknown keys named, nested sections built."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"config key '{path}': expected a mapping, got {type(given).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in given.items():
        key = f"{path}.{k}" if path else str(k)
        if k not in known:
            raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(known))})")
        build = known[k].metadata.get("build")
        kwargs[k] = build(v, key) if build else v
    return cls(**kwargs)


def _section(cls: type) -> Callable[[Any, str], Any]:
    return lambda given, key: _build(cls, given, key)
