"""The run config's one table of defaults, rendered: as a complete annotated YAML config
(``python -m pipeline config``) and as the Markdown tables of docs/configuration.md. Both come
from the dataclasses of :mod:`pipeline.config`, field by field, so they cannot drift apart."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

import yaml

from pipeline.align import ModalitySpan
from pipeline.config import RunConfig, _build_spans, _plain, _Section, _span_help, _span_keys
from pipeline.config_base import _default

__all__ = ["default_config_yaml", "config_reference_markdown"]

_COMMENT_COLUMN = 30
_HEADER = """\
# bindstream run config: every key, its default and its meaning (`python -m pipeline config`).
# A config file needs only the keys it changes; docs/configuration.md lists the same keys.
# Relative paths resolve against the folder of the config file.
"""


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()


def _span_value(modality: str, span: ModalitySpan) -> str:
    return _yaml_value({k: getattr(span, k) for k in _span_keys(modality)})


def _commented(text: str, comment: str) -> str:
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}"


def _shown(f: dataclasses.Field, value: Any) -> Any:
    return f.metadata.get("example", value)


def _yaml_lines(section: _Section, indent: str) -> list[str]:
    lines = []
    for f in fields(section):
        value, help = getattr(section, f.name), f.metadata["help"]
        if isinstance(value, _Section):
            lines.append(_commented(f"{indent}{f.name}:", help))
            lines += _yaml_lines(value, indent + "  ")
        elif f.metadata.get("build") is _build_spans:
            lines.append(_commented(f"{indent}{f.name}:", help))
            lines += [_commented(f"{indent}  {m}: {_span_value(m, s)}", _span_help(m, s))
                      for m, s in value.items()]
        else:
            lines.append(_commented(f"{indent}{f.name}: {_yaml_value(_shown(f, value))}", help))
        if "item" in f.metadata:  # a list of sections: each entry's keys, commented out
            lines += [_commented(f"{indent}#   {'- ' if i == 0 else '  '}{e.name}: {_yaml_value(_default(e))}",
                                 e.metadata["help"]) for i, e in enumerate(fields(f.metadata["item"]))]
    return lines


def default_config_yaml() -> str:
    """Every key with its default (``sessions``: an example) and its meaning, as a YAML config
    that :func:`load_config` accepts."""
    return _HEADER + "\n".join(_yaml_lines(RunConfig(), "")) + "\n"


def _md_rows(section: _Section, prefix: str) -> list[str]:
    rows = []
    for f in fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if isinstance(value, _Section):
            continue
        if f.metadata.get("build") is _build_spans:
            rows += [f"| `{key}.{m}` | `{_span_value(m, s)}` | {_span_help(m, s)} |"
                     for m, s in value.items()]
            continue
        shown = f"`{_yaml_value(_shown(f, value))}`"
        if "example" in f.metadata:
            shown = f"none; e.g. {shown}"
        rows.append(f"| `{key}` | {shown} | {f.metadata['help'].replace('|', chr(92) + '|')} |")
    return rows


def config_reference_markdown() -> str:
    """The keys as Markdown: one table per section (docs/configuration.md holds this text)."""
    out = []

    def table(title: str, section: _Section, prefix: str) -> None:
        out.extend([title, "", "| key | default | meaning |", "|---|---|---|", *_md_rows(section, prefix), ""])
        for f in fields(section):
            sub = getattr(section, f.name)
            if isinstance(sub, _Section):
                table(f"### `{prefix}{f.name}`: {f.metadata['help']}", sub, f"{prefix}{f.name}.")

    table("### Top level", RunConfig(), "")
    for f in fields(RunConfig):
        if "item" in f.metadata:
            out.extend([f"### `{f.name}[]`: each entry of `{f.name}`", "", "| key | default | meaning |", "|---|---|---|",
                         *(f"| `{f.name}[].{e.name}` | `{_yaml_value(_default(e))}` | "
                           f"{e.metadata['help'].replace('|', chr(92) + '|')} |" for e in fields(f.metadata["item"])), ""])
    return "\n".join(out)
