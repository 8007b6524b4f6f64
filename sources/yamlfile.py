"""Reading YAML that a user or a peer wrote (run configs, session.yaml) with every cost bounded.

``yaml.safe_load`` builds no objects but trusts the document's shape: an alias bomb expands to
gigabytes, 100k-deep nesting overflows the parser's recursion, a second ``model:`` silently
replaces the first, and its error messages quote the offending line in full. :func:`load_yaml`
refuses all of these before anything is built, with a :class:`ConfigError` that names the file
and the line and quotes at most a short prefix of any value.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from sources.errors import ConfigError

__all__ = ["load_yaml", "read_yaml_file", "short", "MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES"]

MAX_YAML_BYTES = 1 << 20  # a config or session.yaml is a few KiB; 1 MiB leaves room for long lists
MAX_YAML_DEPTH = 32  # the deepest real config nests 4 levels
MAX_YAML_NODES = 200_000  # scalars, lists and mappings in one document
_SHORT = 60


def short(value: Any, limit: int = _SHORT) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about user-given values."""
    text = repr(value) if not isinstance(value, (list, dict, tuple, set)) or len(value) < 64 \
        else f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, and reads ``1e-9`` as a number
    (YAML 1.2 and JSON do; PyYAML's YAML 1.1 wants ``1.0e-9`` and would give the string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            if duplicate:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {short(key)} is given twice "
                                  "(a later value would silently replace the first; keep one)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _check_shape(text: str, where: str) -> None:
    """Refuse aliases, nesting deeper than MAX_YAML_DEPTH and more than MAX_YAML_NODES nodes,
    from the parser's event stream (iterative: no recursion, nothing built yet)."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{where}: line {event.start_mark.line + 1}: YAML aliases (*name) are not accepted; "
                              "write the value out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: line {event.start_mark.line + 1}: nested deeper than "
                                  f"{MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ConfigError(f"{where}: more than {MAX_YAML_NODES} values in one document")


def _mark(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else str(problem)[:200]


def load_yaml(data: str | bytes, where: str, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The document in ``data`` (UTF-8), checked as the module docstring says. ``where`` names
    the file or option in every message."""
    if len(data) > max_bytes:
        raise ConfigError(f"{where}: {len(data)} bytes, over the limit of {max_bytes} for a YAML file")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                              "save the file as UTF-8") from None
    try:
        _check_shape(data, where)
        return yaml.load(data, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: builds no objects
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: malformed YAML: {_mark(e)}") from None
    except (ValueError, TypeError, OverflowError) as e:
        # The constructors raise these for values such as impossible dates.
        raise ConfigError(f"{where}: malformed YAML: {str(e)[:200]}") from None


def read_yaml_file(path: Path, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """:func:`load_yaml` of the file at ``path``; its size is checked before it is read. Only a
    regular file is read: opening is non-blocking, so a named pipe or a device is refused at
    once instead of waiting for a writer."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: not a regular file (a folder, named pipe or device); "
                                  "give the path of a YAML file")
            if st.st_size > max_bytes:
                raise ConfigError(f"{path}: {st.st_size} bytes, over the limit of {max_bytes} for a YAML file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return load_yaml(data, str(path), max_bytes=max_bytes)
