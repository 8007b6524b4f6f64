"""What every live source shares: a stop event, wall-time chunking, drop counting, frame scaling.

A live source is an iterator of :class:`~sources.base.Chunk` that never ends by itself: it
ends when :meth:`LiveSource.stop` is called (from another thread), after emitting what it
already holds. Chunks close after ``chunk_seconds`` of wall time, so a chunk never waits
longer than that for more samples.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

import av
import numpy as np

from sources.clock import NUDGE_S, SessionClock, StreamClock
from sources.session import StreamSpec
from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, Chunk
from sources.imagesize import frame_size_problem
from sources.video import scaled_size

__all__ = ["LiveSource", "POLL_S"]

log = logging.getLogger("sources.live")

POLL_S = 0.05  # how often a waiting source checks for stop and for a due chunk
_MAX_WARNINGS = 10


class LiveSource:
    """Base class: subclasses implement :meth:`_samples`, yielding ``(t, item)`` pairs on the
    session clock, or ``None`` when nothing arrived within :data:`POLL_S`."""

    def __init__(self, spec: StreamSpec, clock: SessionClock, *, chunk_seconds: float = 0.5,
                 video_size: int = DEFAULT_VIDEO_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        self.session_clock = clock
        self.clock = StreamClock(spec.clock, clock, offset=spec.offset)
        self.chunk_seconds = chunk_seconds
        self.video_size = video_size
        self.max_pixels = max_pixels
        self.dropped: dict[str, int] = {}
        self._stop = threading.Event()
        self._last_q = -(1 << 62)

    # -- control ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Make the iterator end soon (thread safe); what it holds is still emitted."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def drop(self, reason: str, detail: str) -> None:
        n = self.dropped.get(reason, 0) + 1
        self.dropped[reason] = n
        if n <= _MAX_WARNINGS:
            log.warning("%s: dropped a sample (%s): %s", self.spec.label, reason, detail)

    # -- iteration --------------------------------------------------------------------------
    def _samples(self) -> Iterator[tuple[float, Any] | None]:
        raise NotImplementedError

    def _pack(self, items: list[Any]) -> Any:
        if self.spec.modality == "audio":
            return np.concatenate(items).astype(np.float32)
        return np.stack(items)

    def __iter__(self) -> Iterator[Chunk]:
        times: list[Any] = []
        items: list[Any] = []
        opened = 0.0
        for got in self._samples():
            if got is not None:
                t, item = got
                if not times:
                    opened = time.monotonic()
                times.append(t)
                items.append(item)
            if times and (time.monotonic() - opened >= self.chunk_seconds or self.stopped):
                yield self._chunk(times, items)
                times, items = [], []
            if self.stopped:
                break
        if times:
            yield self._chunk(times, items)

    def _chunk(self, times: list[Any], items: list[Any]) -> Chunk:
        t = np.concatenate([np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in times])
        return Chunk(stream=self.spec.id, modality=self.spec.modality, t=t, data=self._pack(items),
                     t_ingest=time.time(), meta={"session": self.spec.session, "live": self.spec.live})

    # -- helpers ----------------------------------------------------------------------------
    def video_time(self, t: float) -> float:
        """``t`` rounded to whole microseconds and after the previous frame (by the rule of
        :func:`sources.clock.monotone`: a frame far behind stays where it is, for the guard to
        judge): the recorder stores video pts in microseconds, so a replay sees exactly these times."""
        q = int(np.rint(t * 1e6))
        if q <= self._last_q and self._last_q - q <= NUDGE_S * 1e6:
            q = self._last_q + 1
        self._last_q = q
        return float(np.float64(q) / 1e6)

    def rgb(self, frame: av.VideoFrame | np.ndarray) -> np.ndarray:
        """An RGB frame scaled so the short side is ``video_size``, as the replay source does."""
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        w, h = scaled_size(frame.width, frame.height, self.video_size)
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()

    def too_big(self, width: int, height: int) -> bool:
        """True (the frame dropped and counted as ``frame_size``) for a frame the limits refuse."""
        problem = frame_size_problem(width, height, self.max_pixels)
        if problem:
            self.drop("frame_size", problem)
        return problem is not None

