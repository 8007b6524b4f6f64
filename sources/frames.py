"""Depth and thermal frames from a PNG folder or a ``.npy`` array, with a timestamps file.

Timestamps file (CSV, one value per frame, in ``spec.time_unit``):

* one column ``t``: row i is the time of the i-th PNG in filename order (or of ``array[i]``);
* two columns ``frame,t``: ``frame`` is a PNG file name in the folder; frames are emitted in
  the order of the file and PNGs not listed are ignored.

An optional header row (first row whose time is not a number), blank lines and lines starting
with ``#`` are skipped. A ``.npy`` timestamps file holds a 1-D array of times.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np

from sources.errors import SourceError
from sources.session import StreamSpec
from sources._common import (SKIPPED, _chunked, _Chunker, _CpuMeter, _file_to_session, _SpacingCheck, fd_path,
                             media_error, open_checked, open_file)
from sources.base import Chunk
from sources.imagesize import frame_size_problem, png_size
from sources.base import DEFAULT_MAX_PIXELS

__all__ = ["FrameFolderSource", "NpyFramesSource", "read_timestamps"]

logger = logging.getLogger("sources")
_SPACING_S = (1e-3, 10.0)  # plausible seconds between depth or thermal frames: 1000 fps to one every 10 s


def read_timestamps(spec: StreamSpec) -> tuple[list[str] | None, np.ndarray]:
    """(frame names or ``None``, times on the session clock) from ``spec.timestamps``; a warning
    with the unit that would fit when the first frames are spaced implausibly for a camera (a
    ``time_unit`` that does not match the file)."""
    names, times = _read_timestamps(spec)
    check = _SpacingCheck(spec, *_SPACING_S, path=spec.timestamps)
    for t in times[:_SpacingCheck.SAMPLES]:
        check.add(float(t))
    check.finish()
    return names, times


def _read_timestamps(spec: StreamSpec) -> tuple[list[str] | None, np.ndarray]:
    path = spec.timestamps
    if path is None:
        raise SourceError(f"{spec.label}: no timestamps file configured")
    to_session = _file_to_session(spec)
    rel = spec.rel(path)
    if path.suffix.lower() == ".npy":
        try:
            with open_file(spec, path) as f:
                arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _unreadable_npy(spec, f"timestamps {rel}", path, e) from e
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise SourceError(f"{spec.label}: timestamps {rel} must be a 1-D numeric array, got {arr.dtype} {arr.shape}")
        t = arr.astype(np.float64)
        if not np.isfinite(t).all():
            bad = int(np.flatnonzero(~np.isfinite(t))[0])
            raise SourceError(f"{spec.label}: timestamps {rel} entry {bad} is not finite")
        return None, to_session(t)
    return _read_timestamps_csv(spec, path, rel, to_session)


def _unreadable_npy(spec: StreamSpec, what: str, path: Path, e: BaseException) -> SourceError:
    """The error for a ``.npy`` file numpy cannot read. numpy's message can quote the file's
    header: it is logged, not put in the error, which reaches every subscriber."""
    logger.warning("%s: cannot read %s: %s", spec.label, path, e)
    why = e.strerror if isinstance(e, OSError) and e.strerror else "not a readable .npy array (details in the log)"
    return SourceError(f"{spec.label}: cannot read {what}: {why}")


def _read_timestamps_csv(spec: StreamSpec, path: Path, rel: str, to_session: Any) -> tuple[list[str] | None, np.ndarray]:
    """:func:`read_timestamps` of a CSV file. Errors name the line, never quote it."""
    names: list[str] = []
    times: list[float] = []
    ncols: int | None = None
    try:
        with open_file(spec, path, "r", newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            first = True
            for row in reader:
                cells = [c.strip() for c in row]
                if not cells or not any(cells) or cells[0].startswith("#"):
                    continue
                if ncols is None:
                    ncols = len(cells)
                    if ncols not in (1, 2):
                        raise SourceError(f"{spec.label}: timestamps {rel} line {reader.line_num}: expected 't' or "
                                          f"'frame,t' columns, got {ncols}")
                if len(cells) != ncols:
                    raise SourceError(f"{spec.label}: timestamps {rel} line {reader.line_num}: expected {ncols} "
                                      f"fields, got {len(cells)}")
                try:
                    t = float(cells[-1])
                except ValueError:
                    if first:
                        first = False
                        continue  # header row
                    raise SourceError(f"{spec.label}: timestamps {rel} line {reader.line_num}: "
                                      f"the time is not a number") from None
                first = False
                if not math.isfinite(t):
                    raise SourceError(f"{spec.label}: timestamps {rel} line {reader.line_num}: time is not finite")
                if ncols == 2:
                    names.append(cells[0])
                times.append(t)
    except csv.Error as e:
        raise SourceError(f"{spec.label}: malformed timestamps CSV {rel}: {e}") from e
    except OSError as e:
        raise SourceError(f"{spec.label}: cannot read timestamps {rel}: {e.strerror or e}") from e
    if not times:
        raise SourceError(f"{spec.label}: timestamps {rel} holds no times")
    return (names if ncols == 2 else None), to_session(np.asarray(times, dtype=np.float64))


def _frame_values(spec: StreamSpec, arr: np.ndarray, where: str, *, integer_unit_default: str = "mm") -> np.ndarray:
    """One frame (or a stack) in the type it travels in (``sources.base``): 16-bit depth in
    millimetres and 8/16-bit thermal stay the integers they were read as (2-4x smaller than
    float32 on every hop to the encoder, which converts them: ``encoders.preprocess``); any
    other depth becomes float32 metres, other thermal float32 in [0, 1]."""
    if spec.modality == "depth":
        unit = spec.depth_unit
        if unit is None:
            unit = integer_unit_default if np.issubdtype(arr.dtype, np.integer) else "m"
        if unit == "mm" and arr.dtype == np.uint16:
            return arr
        out = arr.astype(np.float32)
        # Division, not * 0.001: it is exactly rounded, so 3000 mm reads as 3.0 m.
        return out / np.float32(1000.0) if unit == "mm" else out
    # thermal: integer frames use their full range, floats are taken as already in [0, 1].
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise SourceError(f"{spec.label}: {where}: thermal values must be uint8, uint16 or float, got {arr.dtype}")


class FrameFolderSource:
    """Depth (16-bit PNG) or thermal (8/16-bit PNG) frames from a folder plus timestamps file.

    Output ``[N, H, W]``: depth as the PNG's uint16 millimetres (float32 metres when
    ``depth_unit`` is ``m``), thermal as the PNG's uint8 / uint16 (their full range is [0, 1]);
    ``sources.base.frame_values`` gives their float meaning. PNGs are decoded with PyAV. A
    frame that does not decode, has the wrong bit depth or a different size from the first
    raises :class:`SourceError` naming it, after the frames before it were emitted.

    ``select``: a :class:`pipeline.selection.FrameSelector`; a frame no window can pick is not
    decoded at all (its file is not opened, so a broken PNG there goes unnoticed).
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0, max_pixels: int | None = None,
                 select: Any = None) -> None:
        if spec.modality not in ("depth", "thermal") or not spec.source.is_dir():
            raise ValueError(f"{spec.label}: FrameFolderSource needs a depth/thermal PNG folder")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.max_pixels = max_pixels
        self.select = select
        self.dropped: dict[str, int] = {}
        self.cpu = _CpuMeter()  # PNG decode; pixel-format conversion as resize_s
        self._frames = self._plan()

    def _plan(self) -> list[tuple[float, Path]]:
        spec = self.spec
        pngs = sorted((spec.source / n for n in _listing(spec) if n.lower().endswith(".png")), key=lambda p: p.name)
        names, times = read_timestamps(spec)
        if names is None:
            if len(times) != len(pngs):
                raise SourceError(f"{spec.label}: {spec.rel(spec.timestamps)} has {len(times)} times for {len(pngs)} "
                                  f"PNG files in {spec.rel(spec.source)}")
            return list(zip(times.tolist(), pngs))
        by_name = {p.name: p for p in pngs}
        plan = []
        for i, (name, t) in enumerate(zip(names, times.tolist())):
            # Only names of files in the folder: a '../x.png' entry cannot reach outside it.
            if name not in by_name:
                raise SourceError(f"{spec.label}: {spec.rel(spec.timestamps)} frame entry {i + 1} names no PNG in "
                                  f"{spec.rel(spec.source)}")
            plan.append((t, by_name[name]))
        return plan

    def __iter__(self) -> Iterator[Chunk]:
        chunker = _Chunker(self.spec, self.chunk_seconds, np.stack)
        yield from _chunked(chunker, self._decode_all(), select=self.select)

    def _decode_all(self) -> Iterator[tuple[float, Any]]:
        shape: tuple[int, ...] | None = None
        plan = self._frames
        for i, (t, path) in enumerate(plan):
            if self.select is not None and not self.select.keep(t, plan[i + 1][0] if i + 1 < len(plan) else None):
                yield t, SKIPPED
                continue
            img = self._decode(path)
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise SourceError(f"{self.spec.label}: frame {path.name} is {img.shape[1]}x{img.shape[0]}, "
                                  f"earlier frames are {shape[1]}x{shape[0]}")
            yield t, img

    def _decode(self, path: Path) -> np.ndarray:
        # One descriptor, checked as it is opened, for the header and the decoder alike.
        fd = open_checked(self.spec, path, follow=True)
        try:
            return self._decode_fd(fd, path)
        finally:
            os.close(fd)

    def _decode_fd(self, fd: int, path: Path) -> np.ndarray:
        spec = self.spec
        rel = spec.rel(path)
        try:
            size = png_size(os.pread(fd, 24, 0))
        except OSError as e:
            raise SourceError(f"{spec.label}: cannot read frame {rel}: {e.strerror or e}") from e
        if size is None:
            raise SourceError(f"{spec.label}: frame {rel} is not a PNG (a PNG starts with its signature and "
                              "its IHDR chunk); not decoded")
        problem = frame_size_problem(*size, self.max_pixels if self.max_pixels is not None else DEFAULT_MAX_PIXELS)
        if problem:
            raise SourceError(f"{spec.label}: frame {rel} refused before decoding: its header says {problem}")
        target = fd_path(fd)
        try:
            t0 = time.thread_time()  # opening (probing) the PNG is part of decoding it
            with av.open(target if target is not None else os.fdopen(os.dup(fd), "rb")) as c:
                frame = next(c.decode(video=0))
                t1 = time.thread_time()
                self.cpu.decode_s += t1 - t0
                fmt = frame.format.name
                if spec.modality == "depth":
                    if fmt not in ("gray16be", "gray16le"):
                        raise SourceError(f"{spec.label}: depth frame {rel} is {fmt}, expected a 16-bit "
                                          f"grayscale PNG")
                    raw = frame.to_ndarray()
                elif fmt in ("gray", "gray16be", "gray16le"):
                    raw = frame.to_ndarray()
                else:
                    deep = any(d in fmt for d in ("16", "48", "64"))
                    raw = frame.reformat(format="gray16le" if deep else "gray").to_ndarray()
                self.cpu.resize_s += time.thread_time() - t1
        except (av.FFmpegError, OSError, StopIteration) as e:
            raise SourceError(f"{spec.label}: cannot decode frame {rel}: {media_error(e) if str(e) else 'no image'}") from e
        return _frame_values(spec, raw, rel)


class NpyFramesSource:
    """Depth or thermal frames from a ``[N, H, W]`` ``.npy`` array plus N timestamps.

    Depth: integer arrays are millimetres, float arrays metres, unless ``depth_unit`` says
    otherwise; uint16 millimetres travel as they are, anything else as float32 metres.
    Thermal: uint8 / uint16 travel as they are (full range = [0, 1]), floats as float32.
    The array is memory-mapped, so only one chunk is in memory at a time.
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0) -> None:
        if spec.modality not in ("depth", "thermal"):
            raise ValueError(f"{spec.label}: NpyFramesSource needs a depth or thermal stream")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.dropped: dict[str, int] = {}
        rel = spec.rel(spec.source)
        self._arr = _load_npy(spec)
        if self._arr.ndim != 3:
            raise SourceError(f"{spec.label}: {rel} must be [N, H, W], got shape {self._arr.shape}")
        dt = self._arr.dtype
        ok = (dt in (np.uint8, np.uint16) or np.issubdtype(dt, np.floating)) if spec.modality == "thermal" else (
            np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating))
        if not ok:
            raise SourceError(f"{spec.label}: {rel} has dtype {dt}, not usable as {spec.modality} values")
        _, self._t = read_timestamps(spec)
        if len(self._t) != self._arr.shape[0]:
            raise SourceError(f"{spec.label}: {spec.rel(spec.timestamps)} has {len(self._t)} times for "
                              f"{self._arr.shape[0]} frames in {rel}")

    def __iter__(self) -> Iterator[Chunk]:
        chunker = _Chunker(self.spec, self.chunk_seconds,
                           lambda xs: _frame_values(self.spec, np.stack(xs), self.spec.rel(self.spec.source)))
        yield from _chunked(chunker, ((float(t), np.asarray(self._arr[i])) for i, t in enumerate(self._t)))


def _listing(spec: StreamSpec) -> list[str]:
    """The names in the frame folder, listed from a descriptor checked as it was opened (a
    folder swapped for a symlink since the session was loaded is refused, not listed)."""
    fd = open_checked(spec, spec.source)
    try:
        return os.listdir(fd) if os.listdir in os.supports_fd else os.listdir(spec.source)
    except OSError as e:
        raise SourceError(f"{spec.label}: cannot list {spec.rel(spec.source)}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _load_npy(spec: StreamSpec) -> np.ndarray:
    """``spec.source`` memory-mapped, from the descriptor :func:`open_checked` opened (its
    ``/proc/self/fd`` path; read whole where there is none)."""
    fd = open_checked(spec, spec.source)
    target = fd_path(fd)
    try:
        if target is not None:
            return np.load(target, mmap_mode="r", allow_pickle=False)
        with os.fdopen(os.dup(fd), "rb") as f:
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _unreadable_npy(spec, spec.rel(spec.source), spec.source, e) from e
    finally:
        os.close(fd)
