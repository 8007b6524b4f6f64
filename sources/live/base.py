"""What every live source shares: a stop event, wall-time chunking, drop counting, frame scaling.

A live source is an iterator of :class:`~sources.base.Chunk` that never ends by itself: it
ends when :meth:`LiveSource.stop` is called (from another thread), after emitting what it
already holds. Chunks close after ``chunk_seconds`` of wall time, so a chunk never waits
longer than that for more samples, or once their items hold a quarter of the stream's byte
budget (``queue_bytes``, :mod:`sources.live.inbox`), so a flood of large frames cannot pile
up in an open chunk.

Frames (vision, depth, thermal) of another size than the stream's first frame are rescaled to
the first size, per frame (vision: area interpolation after the usual ``video_size`` scaling;
depth and thermal: nearest neighbour, which keeps NaN holes and never mixes depths), counted in
:attr:`LiveSource.resized` and logged once: a chunk always stacks, and the stream never dies
of a sender that changes resolution.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import av
import numpy as np
import zmq

from sources.clock import NUDGE_S, SessionClock, StreamClock
from sources.session import StreamSpec
from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, Chunk
from sources.imagesize import frame_size_problem
from sources.video import scaled_size
from sources.live.inbox import DEFAULT_QUEUE_BYTES, Inbox, ZmqReceiver

__all__ = ["LiveSource", "POLL_S"]

log = logging.getLogger("sources.live")

_FRAMES = ("vision", "depth", "thermal")
POLL_S = 0.05  # how often a waiting source checks for stop and for a due chunk
_MAX_WARNINGS = 10


class LiveSource:
    """Base class: subclasses implement :meth:`_samples`, yielding ``(t, item)`` pairs on the
    session clock, or ``None`` when nothing arrived within :data:`POLL_S`."""

    def __init__(self, spec: StreamSpec, clock: SessionClock, *, chunk_seconds: float = 0.5,
                 video_size: int = DEFAULT_VIDEO_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.spec = spec
        self.session_clock = clock
        self.clock = StreamClock(spec.clock, clock, offset=spec.offset)
        self.chunk_seconds = chunk_seconds
        self.video_size = video_size
        self.max_pixels = max_pixels
        self.queue_bytes = int(spec.option("queue_bytes", queue_bytes))
        self.dropped: dict[str, int] = {}
        self.resized = 0  # frames rescaled to the stream's first size
        self.inbox: Inbox | None = None  # zmq kinds: what waits between the socket and the reader
        self._first_shape: tuple[int, ...] | None = None
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
        held = 0  # bytes of the open chunk's items
        for got in self._samples():
            if got is not None:
                t, item = got
                if not times:
                    opened = time.monotonic()
                if self.spec.modality in _FRAMES:
                    item = self._same_size(item)
                times.append(t)
                items.append(item)
                held += int(getattr(item, "nbytes", 0))
            if times and (time.monotonic() - opened >= self.chunk_seconds or self.stopped
                          or held >= self.queue_bytes // 4):
                yield self._chunk(times, items)
                times, items, held = [], [], 0
            if self.stopped:
                break
        if times:
            yield self._chunk(times, items)

    # -- receiving through a bounded inbox (zmq kinds) --------------------------------------
    def receiver(self, setup: Callable[[zmq.Context, ZmqReceiver], zmq.Socket], *, max_bytes: int,
                 reply: bytes | None = None, reconnect: str | None = None) -> ZmqReceiver:
        """Starts the thread that owns the stream's socket (``setup(ctx, receiver)`` makes it)
        and fills :attr:`inbox`; raises what ``setup`` raised."""
        self.inbox = Inbox(self.queue_bytes)
        rx: ZmqReceiver
        rx = ZmqReceiver(lambda ctx: setup(ctx, rx), self.inbox, self.session_clock.now, self.drop,
                         max_bytes=max_bytes, reply=reply, reconnect=reconnect)
        rx.start()
        try:
            rx.wait_started()
        except BaseException:
            rx.join()
            raise
        return rx

    def drain(self, rx: ZmqReceiver, handle: Callable[[list[bytes], float], Iterator[tuple[float, Any]]]
              ) -> Iterator[tuple[float, Any] | None]:
        """``handle(frames, arrival)``'s samples for each message of the inbox, ``None`` when
        none came within :data:`POLL_S`; stops the receiver at the end."""
        assert self.inbox is not None
        try:
            while not self.stopped:
                got = self.inbox.get(POLL_S)
                if got is None and rx.error is not None:
                    raise rx.error  # the socket could not be opened again after its connection broke
                if got is None:
                    yield None
                    continue
                yield from handle(*got)
                yield None
        finally:
            rx.halt.set()
            rx.join()

    def _same_size(self, item: np.ndarray) -> np.ndarray:
        """``item`` at the stream's first frame size (module docstring)."""
        shape = tuple(item.shape)
        if self._first_shape is None:
            self._first_shape = shape
            return item
        if shape == self._first_shape:
            return item
        self.resized += 1
        if self.resized == 1:
            log.warning("%s: a frame of %s where the stream started with %s: rescaled to the first size "
                        "(every such frame is; counted as resized)", self.spec.label, shape, self._first_shape)
        h, w = self._first_shape[:2]
        if item.ndim == 3 and item.dtype == np.uint8 and item.shape[2] == 3:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(item), format="rgb24")
            return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
        rows = (np.arange(h) * item.shape[0] // h).astype(np.intp)
        cols = (np.arange(w) * item.shape[1] // w).astype(np.intp)
        return np.ascontiguousarray(item[rows][:, cols])

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

