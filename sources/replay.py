"""Pick the replay source for a validated stream of a recorded session."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from sources.session import SessionSpec, StreamSpec
from sources.audio import AudioSource
from sources.bag import BagSource
from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, Chunk
from sources.frames import FrameFolderSource, NpyFramesSource
from sources.imu import ImuCsvSource
from sources.text import TextJsonlSource
from sources.video import VideoSource

__all__ = ["Source", "ReplayPacer", "cut_chunk", "open_source", "open_session"]


@runtime_checkable
class Source(Protocol):
    """What every source offers: its stream, drop counters by reason, and chunks."""

    spec: StreamSpec
    dropped: dict[str, int]

    def __iter__(self) -> Iterator[Chunk]: ...


def open_source(spec: StreamSpec, *, chunk_seconds: float = 1.0, video_size: int = DEFAULT_VIDEO_SIZE,
                max_pixels: int = DEFAULT_MAX_PIXELS, select: Any = None) -> Source:
    """The replay source for ``spec``. Nothing is decoded until it is iterated, except that
    frame folders and ``.npy`` arrays check their timestamps file here (``SourceError``).
    ``select``: a :class:`pipeline.selection.FrameSelector` for the stream (video, PNG-folder and
    bag image frames only; see :func:`pipeline.selection.frame_selector`), or ``None`` for every frame."""
    kind = spec.kind
    if kind == "bag":
        return BagSource(spec, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels, select=select)
    if kind == "media":
        if spec.modality == "audio":
            return AudioSource(spec, chunk_seconds=chunk_seconds)
        return VideoSource(spec, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels,
                           select=select)
    if kind == "csv":
        return ImuCsvSource(spec, chunk_seconds=chunk_seconds)
    if kind == "jsonl":
        return TextJsonlSource(spec, chunk_seconds=chunk_seconds)
    if kind == "png_dir":
        return FrameFolderSource(spec, chunk_seconds=chunk_seconds, max_pixels=max_pixels, select=select)
    return NpyFramesSource(spec, chunk_seconds=chunk_seconds)


def open_session(session: SessionSpec, *, chunk_seconds: float = 1.0, video_size: int = DEFAULT_VIDEO_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Source]:
    """One replay source per stream of ``session``, keyed by stream id, in file order."""
    return {s.id: open_source(s, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels)
            for s in session.streams}


def cut_chunk(chunk: Chunk, i: int) -> tuple[Chunk, Chunk]:
    """``chunk`` as its first ``i`` samples, bounded by the next sample's time (``passed``),
    and the rest, which keeps the chunk's own ``passed``."""
    head = dataclasses.replace(chunk, t=chunk.t[:i], data=chunk.data[:i], meta=dict(chunk.meta),
                               passed=float(chunk.t[i]))
    return head, dataclasses.replace(chunk, t=chunk.t[i:], data=chunk.data[i:], meta=dict(chunk.meta))


class ReplayPacer:
    """When a replay at ``rate`` > 0 sends each chunk of one stream, as a live source could.

    Stream time maps to wall time from the stream's first sample: ``wall0 + (x - t_first) / rate``;
    ``wall0`` is the run's common start (``time.time()`` seconds, so that streams whose actors
    came up at different moments still keep time together), else when the pacer is made.
    A chunk goes out once the sample after it exists (its ``passed``), but at most ``every``
    seconds of stream time after its newest sample, and at the first time after it that a
    window waits for (``next_need``) when that comes sooner; ``passed`` is cut to that send
    time, so it never promises what a live source could not know yet. While a stream waits for
    its next chunk (captions seconds apart, the gaps of frame selection), :meth:`wait` yields a
    watermark every ``every`` seconds of stream time: the stream holds no sample before it (the
    next samples are in the chunk waited for), and the aligner need not wait for the next one.
    ``next_need(x)``, when given, is the first stream time after ``x`` that a window waits for
    (its end, plus the modality's tolerance), or ``None``: a watermark is sent then, not only
    every ``every``. ``clock`` and ``sleep`` are injected for tests.

    ``stop_waiting(x)``, when given, is asked while a chunk whose first sample is at stream time
    ``x`` waits: once it returns true, that chunk and every later one of the stream go out at
    once, uncut, as at rate 0 (:attr:`unpaced_from` is then ``x``). Paced text uses it for a
    caption far beyond every other stream of its session, which would otherwise keep the replay
    running until the replay clock reached it (``pipeline.reader.StreamReader``).
    """

    def __init__(self, rate: float, every: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 next_need: Callable[[float], float | None] | None = None,
                 wall0: float | None = None, stop_waiting: Callable[[float], bool] | None = None) -> None:
        if not rate > 0 or not every > 0:
            raise ValueError(f"ReplayPacer: rate and every must be > 0, got {rate!r}, {every!r}")
        self.rate = rate
        self.every = every
        self.clock = clock
        self.sleep = sleep
        self.next_need = next_need
        self.wall0 = clock() if wall0 is None else wall0
        self.t_first: float | None = None
        self.stop_waiting = stop_waiting
        self.unpaced_from: float | None = None  # set once stop_waiting said so: nothing waits from then on

    def split(self, chunk: Chunk) -> list[Chunk]:
        """``chunk`` cut where a window waits for the stream (``next_need``), so the samples up
        to a window's end go out when the replay clock reaches it, not with the rest of the
        chunk: chunks can stay long (few actor calls) without holding windows back. Each piece
        but the last is bounded by the next piece's first sample (its ``passed``). A chunk whose
        times are not increasing, or any chunk before the window grid is known, stays whole."""
        t = chunk.t
        if self.unpaced_from is not None or self.next_need is None or len(t) < 2 or not bool(np.all(np.diff(t) > 0)):
            return [chunk]
        pieces: list[Chunk] = []
        while len(chunk) > 1:
            need = self.next_need(float(chunk.t[0]))  # > t[0], so every piece holds a sample
            cut = len(chunk) if need is None else int(np.searchsorted(chunk.t, need, side="left"))
            if cut >= len(chunk):
                break
            piece, chunk = cut_chunk(chunk, cut)
            pieces.append(piece)
        return pieces + [chunk]

    def anchor(self, chunk: Chunk) -> float:
        """Start the stream's clock at ``chunk``'s first sample without waiting (paced replay
        sends a stream's first sample before the run's clock starts, see ``pipeline.reader.StreamReader``).
        Returns the wall time at which the clock reaches ``chunk``'s newest sample: when a live
        source could have sent it, which is when it counts as entering the pipeline."""
        if self.t_first is None:
            self.t_first = float(np.nanmin(chunk.t))
        return self.wall(float(np.nanmax(chunk.t)))

    def wall(self, x: float) -> float:
        """The wall time (``time.time()`` seconds) at which the replay clock reaches stream time ``x``."""
        assert self.t_first is not None
        return self.wall0 + (x - self.t_first) / self.rate

    def wait(self, chunk: Chunk, sent_upto: Callable[[], float]) -> Iterator[float]:
        """Sleep until ``chunk`` is due, yielding watermark times to send on the way.
        ``sent_upto()``: stream time up to which the aligner has every sample of the stream."""
        cap = float(np.nanmin(chunk.t))  # nothing is promised past an unsent sample
        if self.t_first is None:
            self.t_first = cap
        if self._stopped(cap):
            return
        newest = float(np.nanmax(chunk.t))
        x_send = min(chunk.known_at(), newest + self.every)
        need = self.next_need(newest) if self.next_need is not None else None
        if need is not None and need < x_send:
            # A window waits for the stream before the next sample exists (a depth frame at
            # e_k, the next 0.1 s later, tolerance 0.05): by then a live source knows that
            # nothing came in between, as a watermark-only chunk would say.
            x_send = need
        if chunk.passed is not None:
            chunk.passed = min(float(chunk.passed), x_send)
        due = self.wall(x_send)
        while True:
            now = self.clock()
            if now >= due or self._stopped(cap):
                return
            upto = sent_upto()
            x_beat = upto + self.every
            need = self.next_need(upto) if self.next_need is not None and math.isfinite(upto) else None
            if need is not None and upto < need < x_beat:
                x_beat = need
            if not math.isfinite(x_beat) or x_beat >= cap:  # no watermark to send before the chunk
                if self.stop_waiting is None or due - now <= self.every / self.rate:
                    self.sleep(due - now)
                    return
                self.sleep(self.every / self.rate)  # then stop_waiting is asked again
                continue
            t_beat = self.wall(x_beat)
            if t_beat > now:
                self.sleep(t_beat - now)
            yield x_beat

    def _stopped(self, x: float) -> bool:
        """Whether chunks go out without waiting from one whose first sample is at ``x`` on
        (``stop_waiting``); once true, it stays true for the rest of the stream."""
        if self.unpaced_from is None and self.stop_waiting is not None and self.stop_waiting(x):
            self.unpaced_from = x
        return self.unpaced_from is not None
