"""IMU replay from a CSV file with a header row: column mapping, row filter, unit conversion."""

from __future__ import annotations

import csv
import logging
import math
from typing import Iterator

import numpy as np

from sources.errors import SourceError
from sources.lines import MAX_LINE_CHARS, bounded_lines
from sources.imu_csv import imu_cell, imu_csv_rows
from sources.session import IMU_ROLES, StreamSpec
from sources._common import _chunked, _Chunker, _Drops, _file_to_session, _SpacingCheck, open_file
from sources.base import Chunk

__all__ = ["ImuCsvSource", "STANDARD_GRAVITY"]

logger = logging.getLogger("sources")

STANDARD_GRAVITY = 9.80665  # m/s^2 per g
_DEG = math.pi / 180.0
_F32_MAX = float(np.finfo(np.float32).max)  # a converted value beyond it would become inf
_SPACING_S = (1e-5, 1.0)  # plausible seconds between IMU samples: 100 kHz to 1 Hz


class ImuCsvSource:
    """Rows of an IMU CSV as float32 ``[N, 6]`` (ax, ay, az m/s^2; gx, gy, gz rad/s).

    Rows not matching ``spec.where`` are skipped silently (they hold other sensors); rows that
    are short, non-numeric or non-finite (NaN, inf, or a value beyond float32's range once
    converted to m/s^2, rad/s) are dropped, counted in ``dropped`` by reason and logged with
    their line number. CSV quoting is off (:func:`sources.imu_csv.imu_csv_rows`): a stray
    ``"`` makes its row non-numeric and costs no other row. A line longer than
    :data:`sources.lines.MAX_LINE_CHARS` (64 Ki characters) is read past without being held and
    dropped as ``line_too_long``. A missing column is a :class:`SourceError` raised before any
    chunk is emitted.
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0) -> None:
        if spec.modality != "imu" or spec.columns is None:
            raise ValueError(f"{spec.label}: ImuCsvSource needs an imu stream with columns")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.dropped: dict[str, int] = {}

    def __iter__(self) -> Iterator[Chunk]:
        chunker = _Chunker(self.spec, self.chunk_seconds, lambda rows: np.asarray(rows, dtype=np.float32).reshape(-1, 6))
        yield from _chunked(chunker, self._rows())

    def _rows(self) -> Iterator[tuple[float, list[float]]]:
        spec = self.spec
        drops = _Drops(spec, self.dropped)
        to_session = _file_to_session(spec)
        spacing = _SpacingCheck(spec, *_SPACING_S)
        a_scale = STANDARD_GRAVITY if spec.accel_unit == "g" else 1.0
        g_scale = _DEG if spec.gyro_unit == "deg/s" else 1.0
        scales = (a_scale,) * 3 + (g_scale,) * 3
        try:
            # utf-8-sig: spreadsheet exports start with a BOM that would glue onto the first
            # column name; undecodable bytes become U+FFFD and fail as non-numeric rows.
            with open_file(spec, spec.source, "r", newline="", encoding="utf-8-sig", errors="replace") as f:
                reader = imu_csv_rows(bounded_lines(f, lambda n: drops.drop(
                    "line_too_long", f"line {n} of {spec.source.name} (over {MAX_LINE_CHARS} characters)")))
                header = next(reader, None)
                if header is None:
                    raise SourceError(f"{spec.label}: {spec.rel(spec.source)} is empty (expected a header row)")
                names = [imu_cell(h) for h in header]
                cols = dict(spec.columns or ())
                idx = [self._index(names, cols[r], f"columns.{r}") for r in IMU_ROLES]
                where = [(self._index(names, c, f"where.{c}"), v.strip()) for c, v in spec.where]
                need = max(idx + [i for i, _ in where]) + 1
                for row in reader:
                    line = reader.line_num
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue  # blank line
                    if len(row) < need:
                        drops.drop("short_row", f"line {line} of {spec.source.name} ({len(row)} fields, need {need})")
                        continue
                    if any(imu_cell(row[i]) != v for i, v in where):
                        continue
                    try:
                        vals = [float(imu_cell(row[i])) for i in idx]
                    except ValueError:
                        drops.drop("non_numeric", f"line {line} of {spec.source.name}")
                        continue
                    sample = [v * s for v, s in zip(vals[1:], scales)]
                    if not (math.isfinite(vals[0]) and all(abs(v) <= _F32_MAX for v in sample)):
                        drops.drop("non_finite", f"line {line} of {spec.source.name}")
                        continue
                    t = to_session(vals[0])
                    spacing.add(t)
                    yield t, sample
        except csv.Error as e:
            raise SourceError(f"{spec.label}: malformed CSV in {spec.rel(spec.source)} near line {reader.line_num}: "
                              f"{e}") from e
        except OSError as e:
            raise SourceError(f"{spec.label}: cannot read {spec.rel(spec.source)}: {e.strerror or e}") from e
        finally:
            spacing.finish()
            drops.summary()

    def _index(self, names: list[str], col: str, key: str) -> int:
        try:
            return names.index(col)
        except ValueError:
            # The header's names are the file's content: logged here, not put in the error,
            # which reaches every subscriber.
            logger.warning("%s: header of %s: %s", self.spec.label, self.spec.source, ", ".join(names[:20]))
            raise SourceError(f"{self.spec.label}: column {col!r} (key {key}) missing in the header row of "
                              f"{self.spec.rel(self.spec.source)} ({len(names)} columns; their names are in the "
                              f"log)") from None
