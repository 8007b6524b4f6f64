"""Helpers shared by the replay sources: time batching, drop accounting, media opening."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import av
import numpy as np

from pipeline.errors import SourceError
from pipeline.session import TIME_UNITS, StreamSpec
from sources.base import Chunk

logger = logging.getLogger("sources")

# Warn about the first few bad rows of each kind, then only count: a file with a million
# NaN rows must not flood the log.
_MAX_WARNINGS_PER_REASON = 10


class _Drops:
    """Counts dropped samples by reason into the source's public ``dropped`` dict."""

    def __init__(self, spec: StreamSpec, counts: dict[str, int]) -> None:
        self._spec = spec
        self.counts = counts

    def drop(self, reason: str, where: str) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= _MAX_WARNINGS_PER_REASON:
            logger.warning("%s: dropped %s (%s)", self._spec.label, where, reason)
        elif n == _MAX_WARNINGS_PER_REASON + 1:
            logger.warning("%s: more rows dropped for %s; counting silently", self._spec.label, reason)

    def summary(self) -> None:
        if self.counts:
            logger.warning("%s: dropped in total %s from %s", self._spec.label, self.counts, self._spec.source)


class _Batcher:
    """Groups samples into chunks spanning about ``chunk_seconds`` of stream time.

    A chunk is closed when the next sample lies ``chunk_seconds`` or more from the chunk's
    first sample (either direction, so a clock that jumps back cannot grow one chunk forever).
    """

    def __init__(self, spec: StreamSpec, chunk_seconds: float, pack: Callable[[list], Any]) -> None:
        if not chunk_seconds > 0:
            raise ValueError(f"{spec.label}: chunk_seconds must be > 0, got {chunk_seconds!r}")
        self._spec = spec
        self._span = chunk_seconds
        self._pack = pack
        self._t: list[float] = []
        self._items: list = []

    def add(self, t: float, item: Any) -> Chunk | None:
        out = None
        if self._t and abs(t - self._t[0]) >= self._span:
            newest = max(self._t)
            out = self.flush()
            # The sample that closes the chunk bounds it, if the stream moves forward by less
            # than a chunk (a jump is left to the clock guard and the next chunk's watermark).
            if out is not None and newest <= t <= newest + self._span:
                out.passed = float(t)
        self._t.append(t)
        self._items.append(item)
        return out

    def flush(self) -> Chunk | None:
        if not self._t:
            return None
        chunk = _chunk(self._spec, np.asarray(self._t, dtype=np.float64), self._pack(self._items))
        self._t, self._items = [], []
        return chunk


def _chunk(spec: StreamSpec, t: np.ndarray, data: Any) -> Chunk:
    return Chunk(stream=spec.id, modality=spec.modality, t=t, data=data, t_ingest=time.time(),
                 meta={"session": spec.session})


def _file_to_session(spec: StreamSpec) -> Callable[[Any], Any]:
    """Map a time read from a file (in ``spec.time_unit``) to the session clock in seconds.

    The offset is added in file units before scaling: device clocks are often epoch values
    (1.7e12 ms) whose offset cancels exactly in those units, keeping sub-microsecond
    precision that scaling first would lose to float64 rounding.
    """
    scale = TIME_UNITS[spec.time_unit]
    off = spec.offset / scale
    return lambda v: (v + off) * scale


def _open_media(spec: StreamSpec) -> av.container.InputContainer:
    try:
        return av.open(str(spec.source))
    except (av.FFmpegError, OSError) as e:
        raise SourceError(f"{spec.label}: cannot open {spec.source}: {e}") from e


def _demux_decode(spec: StreamSpec, container: av.container.InputContainer, stream: Any, what: str) -> Iterator[Any]:
    """Decoded frames of ``stream``; :class:`SourceError` on corrupt data or a short file.

    The caller has already emitted every frame yielded before the error, so the good prefix
    of a damaged file still reaches the pipeline.
    """
    packets = 0
    frames = 0
    try:
        for packet in container.demux(stream):
            if packet.size:  # the final flush packet is empty
                packets += 1
            for frame in packet.decode():
                frames += 1
                yield frame
    except (av.FFmpegError, OSError) as e:
        raise SourceError(f"{spec.label}: {what} decoding failed in {spec.source} after {frames} frames: {e}") from e
    # A file cut short after its index (moov first) demuxes without error; the index still
    # says how many packets there should have been.
    declared = stream.frames
    if declared and packets < declared:
        raise SourceError(f"{spec.label}: {spec.source} is truncated: {packets} of {declared} {what} packets present")
    if frames == 0:
        raise SourceError(f"{spec.label}: no {what} frames decoded from {spec.source}")


def _batched(batch: _Batcher, samples: Iterator[tuple[float, Any]]) -> Iterator[Chunk]:
    """Chunks of ``samples``; on :class:`SourceError` the buffered tail is emitted first."""
    try:
        for t, item in samples:
            chunk = batch.add(t, item)
            if chunk is not None:
                yield chunk
    except SourceError:
        tail = batch.flush()
        if tail is not None:
            yield tail
        raise
    tail = batch.flush()
    if tail is not None:
        yield tail
