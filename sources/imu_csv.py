"""Reading IMU CSV files: numeric, so CSV quoting is off; and the load-time check that the
columns a stream names are in the file's header row."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Iterator

from sources.errors import ConfigError
from sources.yamlfile import short

__all__ = ["imu_csv_rows", "imu_cell", "check_imu_header"]


def imu_csv_rows(lines: Iterable[str]) -> Iterator[list[str]]:
    """The fields of each line of an IMU CSV, with CSV quoting off: the files are numeric, so a
    stray ``"`` stays in its field (a bad value in one row) instead of opening a quoted field
    that would swallow the lines after it. Read cells through :func:`imu_cell`."""
    return csv.reader(lines, quoting=csv.QUOTE_NONE)


def imu_cell(cell: str) -> str:
    """A field of :func:`imu_csv_rows` without surrounding blanks and without one pair of
    surrounding double quotes (spreadsheet exports quote header names)."""
    cell = cell.strip()
    if len(cell) >= 2 and cell[0] == cell[-1] == '"':
        cell = cell[1:-1].strip()
    return cell


_HEADER_NAMES_SHOWN = 20
_HEADER_NAME_CHARS = 40


def check_imu_header(source: Path, needed: list[str], at: str) -> None:
    """Every column the stream names (``columns``, ``where``) is in the CSV's header row, read
    here (its first 64 KiB at most) so that a typo is a config error before anything starts.
    The message shows at most 20 of the file's names, each as it is when printable and at most
    40 characters, else quoted, escaped and cut by :func:`~sources.yamlfile.short`: the first
    line may be binary or one huge line."""
    try:
        with open(source, newline="", encoding="utf-8-sig", errors="replace") as f:
            first = f.readline(64 * 1024)
    except OSError as e:
        raise ConfigError(f"{at}: key 'source': cannot read {source}: {e.strerror or e}") from None
    names = [imu_cell(h) for h in next(imu_csv_rows([first]), [])]
    missing = [c for c in needed if c not in names]
    if missing:
        shown = [n if n.isprintable() and len(n) <= _HEADER_NAME_CHARS else short(n, _HEADER_NAME_CHARS)
                 for n in names[:_HEADER_NAMES_SHOWN]]
        more = f", ... ({len(names)} columns)" if len(names) > _HEADER_NAMES_SHOWN else ""
        has = ", ".join(shown) + more if names else "no header row"
        cols = ", ".join(short(c) for c in missing[:_HEADER_NAMES_SHOWN])
        raise ConfigError(f"{at}: column{'s' if len(missing) > 1 else ''} {cols} missing in {source}; the file has: {has}")
