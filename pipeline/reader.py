"""Reading a session's streams, each in a thread of the session's aligner process
(:class:`ReaderHost`). A :class:`StreamReader` hands its chunks to the session through a
:class:`SessionPort`, which runs the calls on the aligner's event loop: a chunk goes by
reference, with no Ray call, and at most ``max_inflight`` pushes are outstanding, so a slow
aligner holds the reader back (backpressure) instead of decoded frames queueing without limit.
The session's ports share a :class:`ReadProgress`: how far its streams have been read, which
paced text asks before waiting for a caption far beyond every other stream."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Coroutine, Iterable, Iterator, Mapping, Protocol

import numpy as np
import ray

__all__ = ["Session", "ReadProgress", "SessionPort", "StreamReader", "ReaderHost"]

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a reader needs of its session (:class:`pipeline.session_actor.AlignerActor`)."""

    async def push(self, chunk: Any, seq: int) -> float | None: ...

    async def wait_origin(self, timeout_s: float) -> float | None: ...

    async def end_stream(self, stream: str, error: str | None = None, dropped: dict[str, int] | None = None,
                         chunks: int = 0) -> None: ...


class ReadProgress:
    """How far the streams of one session have been read: the latest sample time each pushed,
    and which have ended. Its session's ports share it, each from its reader's thread."""

    def __init__(self, modalities: Mapping[str, str]) -> None:
        self._modality = dict(modalities)  # stream id -> modality: every stream of the session
        self._latest: dict[str, float] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def reached(self, stream: str, t: float) -> None:
        """``stream`` pushed a sample at stream time ``t``."""
        with self._lock:
            self._latest[stream] = max(t, self._latest.get(stream, -math.inf))

    def ended(self, stream: str) -> None:
        with self._lock:
            self._ended.add(stream)

    def sensors_end(self) -> float | None:
        """The latest sample time of the session's streams other than text, once every one of
        them has ended; ``None`` while one is still read, or when none of them pushed a sample
        (there is no end to compare a caption with)."""
        with self._lock:
            sensors = [s for s, m in self._modality.items() if m != "text"]
            if not all(s in self._ended for s in sensors):
                return None
            times = [self._latest[s] for s in sensors if s in self._latest]
        return max(times) if times else None


class SessionPort:
    """One stream's way into its session, for the reader's thread: every call runs on the
    session's event loop (``loop``). At most ``max_inflight`` pushes are outstanding; :meth:`push`
    blocks the reader while the session holds them back. ``progress``: the session's
    :class:`ReadProgress`, which the port keeps up to date with this stream's pushes and end."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop, stream: str, max_inflight: int,
                 progress: ReadProgress | None = None) -> None:
        self._session, self._loop, self.stream = session, loop, stream
        self._max = max(1, int(max_inflight))
        self._inflight: collections.deque[concurrent.futures.Future] = collections.deque()
        self._origin: float | None = None
        self._progress = progress

    def push(self, chunk: Any, seq: int) -> float | None:
        """Hand ``chunk`` (the stream's ``seq``-th) to the session; returns the session's window
        origin once it is fixed, else ``None``. Raises if the session refused a chunk."""
        while len(self._inflight) >= self._max:
            self._note(self._inflight.popleft().result())
        self._inflight.append(self._call(self._session.push(chunk, seq)))
        if self._progress is not None and len(chunk):
            self._progress.reached(self.stream, float(np.nanmax(chunk.t)))
        while self._inflight and self._inflight[0].done():  # replies already in: the origin early
            self._note(self._inflight.popleft().result())
        return self._origin

    def origin(self, timeout_s: float) -> float | None:
        """The session's window origin, waiting up to ``timeout_s`` for it to be fixed."""
        if self._origin is None:
            self._note(self._call(self._session.wait_origin(timeout_s)).result())
        return self._origin

    def flush(self) -> None:
        """Wait until the session has applied every push; raises if it refused one."""
        while self._inflight:
            self._note(self._inflight.popleft().result())

    def end(self, error: str | None, dropped: dict[str, int], chunks: int) -> None:
        """End the stream after ``chunks`` chunks. Pushes still outstanding are waited for; a
        refusal among them is already the reader's ``error``."""
        for fut in self._inflight:
            try:
                fut.result()
            except Exception:
                pass
        self._inflight.clear()
        try:
            self._call(self._session.end_stream(self.stream, error, dropped, chunks)).result()
        finally:
            if self._progress is not None:
                self._progress.ended(self.stream)

    def sensors_end(self) -> float | None:
        """:meth:`ReadProgress.sensors_end` of the session (``None`` without one)."""
        return self._progress.sensors_end() if self._progress is not None else None

    def _call(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _note(self, reply: float | None) -> None:
        if reply is not None:
            self._origin = float(reply)


class StreamReader:
    """Reads one stream (a recording, paced by ``rate``, or a live source) and pushes its chunks
    to the session: clock jumps and bad samples dropped (the guard), frames selected, read ahead
    in paced replay, live chunks recorded when the run records."""

    def __init__(self, session: str, spec: Any, options: dict[str, Any]) -> None:
        self.session = session
        self.spec = spec
        self.options = options
        self.chunks = 0
        self.samples = 0
        self._stop = False
        self._live: Any = None  # live source: stop() ends it
        self._recorder: Any = None  # live recording: written as chunks are pushed
        self._grid_origin: float | None = None  # the session's window origin, once the aligner says
        self._select: Any = None  # the frame selector, or None
        self._port: Any = None  # the SessionPort of the run
        self._sent_upto = -math.inf  # stream time up to which the session has every sample

    def stop(self) -> None:
        """Replay stops after the current chunk; a live source drains what it holds, then ends."""
        self._stop = True
        if self._live is not None:
            self._live.stop()

    def ready(self) -> None:
        """Import what :meth:`run` needs. The driver waits for every stream of the run to be
        ready before starting any, so that they start reading together and a slow start (PyAV
        and the readers imported) is not taken for a lagging stream."""
        import sources.guard  # noqa: F401
        import sources.live  # noqa: F401
        import sources.replay  # noqa: F401

    def run(self, port: SessionPort, rate: float, start_at: float | None = None) -> dict[str, Any]:
        """Read the stream to its end through ``port``; returns its end stats. ``start_at``: the
        wall time (``time.time()``) at which every stream of the run starts, for paced replay.
        ``unpaced_from`` in the stats: the stream time from which paced text stopped waiting
        (:meth:`_beyond_sensors`), else ``None``."""
        from pipeline.metrics import source_cpu_split
        from sources.guard import StreamGuard

        self._port = port
        error: str | None = None
        source = prefetch = guard = pacer = None
        wall_start, thread0 = time.time(), time.thread_time()  # this thread: the base of the CPU split
        try:
            # max_gap_s belongs to the guard, not to the source readers.
            guard = StreamGuard(self.session, self.spec.id, self.spec.modality,
                                max_gap_s=float(self.options.get("max_gap_s") or 0.0), now=self._live_now(),
                                source="" if self.spec.live else self.spec.rel(self.spec.source))
            source = self._open()
            pacer, prefetch = self._paced(source, rate, start_at)
            self._read(prefetch if prefetch is not None else source, guard, pacer, start_at)
            port.flush()
        except Exception as exc:  # reported with the stream id; other streams go on
            error = f"{type(exc).__name__}: {exc}"
            log.error("session '%s' stream '%s' failed: %s", self.session, self.spec.id, error)
        if prefetch is not None:
            prefetch.close()
        dropped = dict(getattr(source, "dropped", {}) or {})
        if guard is not None:
            dropped = guard.merge_into(dropped)
        try:
            port.end(error, dropped, self.chunks)
        except Exception as exc:  # the session is ending: reported with the stream
            error = error or f"ending the stream failed: {type(exc).__name__}: {exc}"
        # Thread time: other streams of the session read in this process too.
        split = source_cpu_split(source, time.thread_time() - thread0
                                 + (prefetch.thread_s if prefetch is not None else 0.0))
        return {"stream": self.spec.id, "chunks": self.chunks, "samples": self.samples, "error": error,
                "dropped": dropped, "cpu_s": split["total_s"], "wall_s": time.time() - wall_start,
                "t_start": wall_start, "cpu_split": split,
                "frames_skipped": self._select.skipped if self._select is not None else 0,
                "unpaced_from": getattr(pacer, "unpaced_from", None), **self._close_record()}

    def _live_now(self) -> Any:
        """Live: the session clock's present (plus the stream's ``offset``), the guard's anchor."""
        if self.spec.live is None or self.options.get("epoch") is None:
            return None
        from sources.clock import SessionClock

        clock, extra = SessionClock(float(self.options["epoch"])), float(self.spec.offset or 0.0)
        return lambda: clock.now() + extra

    def _open(self) -> Any:
        """The stream's source: a recording (with its frame selector) or a live source."""
        from sources.replay import open_source

        # align/select_frames belong to the frame selector (replay only: a live frame is already here).
        opts = {k: v for k, v in self.options.items() if k not in ("max_gap_s", "align", "select_frames")}
        align = self.options.get("align")
        if align is not None and align.origin is not None:
            self._grid_origin = float(align.origin)
        if self.spec.live is not None:
            return self._open_live(opts)
        self._select = self._selector()  # takes a configured origin from ``align``
        return open_source(self.spec, select=self._select, **opts)

    def _paced(self, source: Any, rate: float, start_at: float | None) -> tuple[Any, Any]:
        """The replay clock (``sources.replay.ReplayPacer``) and the read-ahead, or ``None``
        twice: as fast as possible, or live. The read-ahead decodes in a thread of lower
        priority, in the slack before each chunk is due: half a chunk's period after the last
        one went out, away from the window ends where the encoder needs the cores."""
        from sources._common import Prefetch
        from sources.replay import ReplayPacer

        if rate <= 0 or self._live is not None:
            return None, None
        pacer = ReplayPacer(rate, float(self.options.get("chunk_seconds") or 1.0), next_need=self._next_need,
                            wall0=start_at, stop_waiting=self._beyond_sensors if self.spec.modality == "text" else None)
        select = self._select
        return pacer, Prefetch(source, depth=2, niceness=4, holdoff_s=pacer.every / rate / 2,
                               after_first=lambda: select is None or select.origin is not None,
                               after_first_s=max(0.0, (start_at or 0.0) - time.time()) + 0.5)

    def _read(self, chunks: Iterable[Any], guard: Any, pacer: Any, start_at: float | None) -> None:
        for chunk in chunks:
            if self._stop and self._live is None:  # a live source drains what it holds, then ends
                break
            chunk = guard.apply(chunk)  # clock jumps, non-finite data: dropped and counted
            if len(chunk) == 0:
                continue
            if pacer is None:
                self._send(chunk)
            else:
                self._send_paced(pacer, chunk, start_at)

    def _send_paced(self, pacer: Any, chunk: Any, start_at: float | None) -> None:
        """Paced replay (``sources.replay.ReplayPacer``): the chunk is cut where windows wait for
        the stream, and each piece waits until a live source could send it; watermark-only
        chunks tell the session meanwhile that a sparse stream has nothing before the replay clock."""
        from sources.base import Chunk

        for piece, paced in self._paced_pieces(pacer, chunk, start_at):
            if not paced:
                self._send(piece, due=pacer.anchor(piece))
                continue
            for x in pacer.wait(piece, lambda: self._sent_upto):
                self._send(Chunk(stream=self.spec.id, modality=self.spec.modality, t=np.empty(0, dtype=np.float64),
                                 data=[] if self.spec.modality == "text" else np.empty(0, dtype=np.float32),
                                 meta={"session": self.session}, passed=x))
            self._send(piece)

    def _send(self, chunk: Any, due: float | None = None) -> None:
        # A sample sent before the replay clock reaches it (a stream's first, see _paced_pieces)
        # counts as entering when a live source could have sent it.
        chunk.t_ingest = max(time.time(), due) if due is not None else time.time()
        self._note_origin(self._port.push(chunk, self.chunks))
        if self._recorder is not None and len(chunk):
            self._recorder.write(chunk)
        self.chunks += 1
        self.samples += len(chunk)
        if len(chunk):
            self._sent_upto = max(self._sent_upto, float(np.nanmax(chunk.t)))
        if chunk.passed is not None:
            self._sent_upto = max(self._sent_upto, float(chunk.passed))

    def _paced_pieces(self, pacer: Any, chunk: Any, start_at: float | None) -> Iterator[tuple[Any, bool]]:
        """``chunk`` in the pieces paced replay sends (``ReplayPacer.split``), each with whether
        it waits for the replay clock. The stream's first sample goes alone and at once, before
        the clock starts (``start_at``; it promises nothing past itself, so a sparse stream does
        not hold it back). The session's grid is fixed from every stream's first sample, so the
        rest of the first chunk is cut at the first window's end, and the frame selector and the
        read-ahead work from the first chunk on."""
        from sources.replay import cut_chunk

        if self._grid_origin is None and self.chunks == 0:
            head, rest = cut_chunk(chunk, 1) if len(chunk) > 1 else (chunk, None)
            head.passed = None
            yield head, False
            self._note_origin(self._port.origin(0.25 + max(0.0, (start_at or 0.0) - time.time())))
            if rest is None:
                return
            chunk = rest
        for piece in pacer.split(chunk):
            yield piece, True

    def _selector(self) -> Any:
        """The stream's frame selector (docs/alignment.md), or ``None``: off, or every frame counts."""
        from pipeline.selection import frame_selector

        if not self.options.get("select_frames") or self.options.get("align") is None:
            return None
        return frame_selector(self.spec.modality, self.options["align"])

    def _note_origin(self, origin: float | None) -> None:
        """The session's window origin, once fixed: the frame selector and the pacer need it."""
        if origin is None or self._grid_origin is not None:
            return
        self._grid_origin = float(origin)
        if self._select is not None and self._select.origin is None:
            self._select.origin = self._grid_origin

    def _beyond_sensors(self, x: float) -> bool:
        """Paced text (``ReplayPacer.stop_waiting``): true when a chunk whose first caption is at
        stream time ``x`` is not worth waiting for: every stream of the session that is not
        text has ended, and ``x`` lies more than one hop (``window.hop``) past the latest sample
        they pushed. Such a caption is in none of the windows those streams reach (the last of
        them ends less than a hop after their last sample), and waiting for it would only keep
        the replay running until its far-off time. The stream's chunks then go out at once, as
        at rate 0 (the same windows), and one warning names the caption: a time that far is most
        likely read in the wrong unit. Nothing is dropped."""
        end = self._port.sensors_end() if self._port is not None else None
        align = self.options.get("align")
        hop = float(align.hop) if align is not None else 1.0
        if end is None or not x > end + hop:
            return False
        where = f" ({self.spec.rel(self.spec.source)})" if self.spec.source is not None else ""
        log.warning("session '%s' stream '%s'%s: a caption at t=%.3f s lies more than window.hop (%g s) past the "
                    "session's other streams, which ended at t=%.3f s; paced replay sends the rest of the stream "
                    "at once instead of waiting for it. Check the captions' time unit (time_unit in the session "
                    "file, docs/session-format.md) and offset",
                    self.session, self.spec.id, where, x, hop, end)
        return True

    def _next_need(self, x: float) -> float | None:
        """When the session next waits for this stream (paced replay aims its watermarks there)."""
        from pipeline.selection import next_need

        align = self.options.get("align")
        if align is None or self._grid_origin is None or self.spec.modality not in align.spans:
            return None
        return next_need(align, self.spec.modality, self._grid_origin, x)

    # -- live streams (docs/live.md) ------------------------------------------------------------
    def _open_live(self, opts: dict[str, Any]) -> Any:
        """The live source for the stream, and its recorder when the run records.
        ``opts`` carries ``epoch`` (the session clock) and ``record_dir`` besides the usual ones."""
        from sources.clock import SessionClock
        from sources.live import open_live_source

        opts = dict(opts)
        epoch = opts.pop("epoch")
        record_dir = opts.pop("record_dir", None)
        self._live = open_live_source(self.spec, SessionClock(epoch), **opts)
        if self._stop:
            self._live.stop()
        if record_dir:
            from sources.record import StreamRecorder

            self._recorder = StreamRecorder(record_dir, self.spec.id, self.spec.modality)
        return self._live

    def _close_record(self) -> dict[str, Any]:
        if self._recorder is None:
            return {}
        try:
            entry = self._recorder.close()
        except Exception as exc:
            log.error("session '%s' stream '%s': closing the recording failed: %s", self.session, self.spec.id, exc)
            entry = None
        return {"record": entry, "record_error": self._recorder.error, "session": self.session,
                "clock_offsets": list(self._live.clock.applied) if self._live else [],
                "clock_mapping": getattr(self._live, "clock_mapping", None)}  # url/device: rtcp, estimated, arrival


class ReaderHost:
    """A session's readers, run in threads of this (the aligner's) process; their ports lead
    onto ``session``'s event loop and share the session's :class:`ReadProgress`. A crash of the
    process ends every stream of the session."""

    def __init__(self, session_name: str, sources: list[tuple[Any, dict[str, Any]]], session: Session) -> None:
        self._session = session
        self._readers = {spec.id: StreamReader(session_name, spec, opts) for spec, opts in sources}
        self._progress = ReadProgress({spec.id: spec.modality for spec, _ in sources})
        # A thread per stream for its run, and as many again for ready() calls made meanwhile.
        self._pool = ThreadPoolExecutor(max_workers=max(1, 2 * len(self._readers)), thread_name_prefix="source")

    async def ready(self, stream: str) -> int:
        """:meth:`StreamReader.ready` in a reader thread; returns the process id."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._readers[stream].ready)
        return os.getpid()

    async def run(self, stream: str, rate: float, max_inflight: int, start_at: float | None = None) -> dict[str, Any]:
        """:meth:`StreamReader.run` in a reader thread, its pushes on this event loop; the end
        stats with the node and process the stream was read in."""
        loop = asyncio.get_running_loop()
        port = SessionPort(self._session, loop, stream, max_inflight, self._progress)
        stats = await loop.run_in_executor(self._pool, self._readers[stream].run, port, rate, start_at)
        return {**stats, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def stop(self, stream: str) -> None:
        self._readers[stream].stop()
