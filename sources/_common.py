"""Helpers shared by the replay sources: time chunking, drop accounting, checked file and media opening."""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import av
import numpy as np

from sources.errors import SourceError
from sources.session import TIME_UNITS, StreamSpec
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


class _HelperThreads:
    """Threads a library started on behalf of one source, and their CPU seconds.

    Adopted as the threads that appear during one call (the call that starts them); their CPU
    clocks are read while they are alive (:meth:`sample`), since a thread's time is gone once
    it ends. ``prefix``: when some adopted threads carry a name starting with it, only those
    count (FFmpeg's decoder threads name themselves "av:<codec>:..."; a thread another library
    started during the same call is then left out). Linux only; elsewhere the total stays 0.
    """

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._tids: set[int] = set()
        self._cpu: dict[int, float] = {}

    def adopt(self, before: set[int]) -> None:
        """Adopt the threads created since ``before`` (a :func:`_thread_ids` snapshot)."""
        self._tids |= _thread_ids() - before

    def sample(self) -> None:
        if not self._tids:
            return
        stats = {tid: _thread_stat(tid) for tid in self._tids}
        alive = {tid: st for tid, st in stats.items() if st is not None}
        named = {tid: st for tid, st in alive.items() if self._prefix and st[0].startswith(self._prefix)}
        chosen = named or alive
        for tid in [t for t in self._cpu if t in alive and t not in chosen]:
            del self._cpu[tid]  # counted before the library's threads had named themselves
        for tid, (_, cpu) in chosen.items():
            self._cpu[tid] = cpu

    @property
    def cpu_s(self) -> float:
        self.sample()
        return sum(self._cpu.values())


class _CpuMeter:
    """CPU seconds a replay source spends decoding and resizing, for the per-stream split.

    ``decode_s`` and ``resize_s`` are ``time.thread_time()`` of the thread iterating the source
    (demux + decode of packets; PyAV ``reformat`` / ``to_ndarray`` / resampling).
    ``codec_threads_s`` and ``scaler_threads_s`` are the CPU of FFmpeg's own threads: with
    ``thread_type = "AUTO"`` video is decoded in worker threads, and swscale scales in slice
    threads, while the iterating thread only waits; thread time alone would leave most of the
    work out of the split. They are the threads that appear during the decoder's first
    ``decode()`` (PyAV opens the codec there) and the scaler's first call.
    """

    def __init__(self) -> None:
        self.decode_s = 0.0
        self.resize_s = 0.0
        self.codec_threads = _HelperThreads("av:")
        self.scaler_threads = _HelperThreads()

    def sample_threads(self) -> None:
        """Read the helper threads' CPU now (call before the decoder or scaler closes)."""
        self.codec_threads.sample()
        self.scaler_threads.sample()

    def as_dict(self) -> dict[str, float]:
        return {"decode_s": self.decode_s, "resize_s": self.resize_s,
                "codec_threads_s": self.codec_threads.cpu_s, "scaler_threads_s": self.scaler_threads.cpu_s}


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # no procfs: codec threads are not measured
        return set()


def _thread_stat(tid: int) -> tuple[str, float] | None:
    """(name, CPU seconds) of one thread of this process; ``None`` once it ended.

    The CPU time is read from the thread's own CPU clock (Linux encodes a thread id into a
    clock id as ``(~tid << 3) | 6``, glibc's MAKE_THREAD_CPUCLOCK): exact, where
    ``/proc/.../stat`` counts 10 ms scheduler ticks and undercounts threads that run in bursts.
    """
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="ascii", errors="replace") as f:
            name = f.read().strip()
        return name, time.clock_gettime((~tid << 3) | 6)
    except (OSError, ValueError, OverflowError, AttributeError):  # ended, or not Linux
        return None


class _Chunker:
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

    def skip(self, t: float) -> Chunk | None:
        """A sample at ``t`` that is not emitted (frame selection). It closes the open chunk at
        once: selected frames come in short runs (the frames around a window end), and the
        window they serve need not wait a chunk length for skipped frames to fill the chunk."""
        if not self._t:
            return None
        newest = max(self._t)
        out = self.flush()
        if out is not None and newest <= t <= newest + self._span:
            out.passed = float(t)
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


class _SpacingCheck:
    """Warns once when the first timestamps of a file stream are spaced implausibly for its
    kind of sensor (an IMU samples between 10 us and 1 s apart, a depth or thermal camera
    between 1 ms and 10 s): the usual cause is a ``time_unit`` that does not match the file
    (microseconds read as seconds put 50 Hz samples 20 034 s apart, each then a ``jump``). Fed
    session seconds; judges the median spacing of the first :attr:`SAMPLES` timestamps, or of
    all of them when the file ends before."""

    SAMPLES = 16

    def __init__(self, spec: StreamSpec, lo: float, hi: float, path: Path | None = None) -> None:
        self._spec = spec
        self._path = spec.source if path is None else path  # the file the timestamps come from
        self._lo, self._hi = lo, hi
        self._t: list[float] | None = []

    def add(self, t: float) -> None:
        if self._t is None:
            return
        self._t.append(t)
        if len(self._t) >= self.SAMPLES:
            self.finish()

    def finish(self) -> None:
        ts, self._t = self._t, None
        if not ts or len(ts) < 3:
            return
        steps = np.diff(np.asarray(ts, dtype=np.float64))
        steps = steps[steps > 0]
        if not len(steps):
            return
        step = float(np.median(steps))
        if self._lo <= step <= self._hi:
            return
        spec = self._spec
        scale = TIME_UNITS[spec.time_unit]
        fits = [u for u, k in TIME_UNITS.items() if self._lo <= step / scale * k <= self._hi]
        better = f" (in {fits[0]} they would be {step / scale * TIME_UNITS[fits[0]]:g} s apart)" if fits else ""
        logger.warning("%s: the first timestamps of %s are %g s apart with time_unit: %s, implausible for %s "
                       "(expected %g to %g s); check the stream's time_unit%s and offset keys in session.yaml",
                       spec.label, spec.rel(self._path), step, spec.time_unit, spec.modality, self._lo, self._hi,
                       better)


def media_error(e: BaseException) -> str:
    """An FFmpeg or OS error in words: PyAV's ``[Errno 1094995529] Invalid data found when
    processing input: 'x.mp4'`` becomes ``Invalid data found when processing input`` (the caller
    names the file)."""
    words = getattr(e, "strerror", None)
    return str(words) if words else (str(e) or type(e).__name__)


_PROC_FD = os.path.isdir("/proc/self/fd")  # Linux: a descriptor's file, by path


def fd_path(fd: int) -> str | None:
    """A path that opens the file ``fd`` holds, whatever its name says now (Linux's
    ``/proc/self/fd/N``), for libraries that open by path (FFmpeg, ``np.load``'s memory map);
    ``None`` where there is none."""
    return f"/proc/self/fd/{fd}" if _PROC_FD else None


def open_checked(spec: StreamSpec, path: Path, *, follow: bool = False) -> int:
    """A read-only descriptor of ``path``, a file of the session, checked as it is opened: a
    file can be swapped for a symlink to any file of the host after the session was validated.

    * ``O_NOFOLLOW``: the session's paths are resolved when it is loaded, so a symlink there
      now was put there since. ``follow``: the PNGs of a frame folder, which may be symlinks
      within the session;
    * the file the descriptor holds must lie inside the session folder (Linux: where
      ``/proc/self/fd`` says it is; elsewhere the path is resolved just before opening);
    * where the session recorded the file when it was loaded (``StreamSpec.file_ids``), it must
      be that file (same device and inode).

    A refusal is a :class:`SourceError` naming the stream and the path relative to the session
    folder (never the path the file now leads to, nor anything read from it).
    """
    rel = spec.rel(path)
    if follow and not _PROC_FD:
        _check_inside(spec, os.path.realpath(path), rel)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise SourceError(f"{spec.label}: {rel} is a symlink now, and was not when the session was loaded; "
                              f"refused (replaced since?)") from None
        raise SourceError(f"{spec.label}: cannot open {rel}: {e.strerror or type(e).__name__}") from None
    try:
        if _PROC_FD:
            _check_inside(spec, os.readlink(f"/proc/self/fd/{fd}"), rel)
        known = spec.file_id(path)
        st = os.fstat(fd)
        if known is not None and (st.st_dev, st.st_ino) != known:
            raise SourceError(f"{spec.label}: {rel} is not the file the session was loaded with (replaced since?); "
                              f"refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_inside(spec: StreamSpec, real: str, rel: str) -> None:
    if spec.root is not None and not Path(real).is_relative_to(spec.root):
        raise SourceError(f"{spec.label}: {rel} leads outside the session folder (replaced since the session was "
                          f"loaded?); refused")


def open_file(spec: StreamSpec, path: Path, mode: str = "rb", **kw: Any) -> Any:
    """:func:`open_checked` as a file object (``open``'s ``mode`` and keywords)."""
    return os.fdopen(open_checked(spec, path), mode, **kw)


def open_av(spec: StreamSpec, path: Path, *, follow: bool = False) -> av.container.InputContainer:
    """``av.open`` on the file :func:`open_checked` opened, not on the path again: FFmpeg opens
    the descriptor's ``/proc/self/fd`` path (its own file protocol, at full speed), or, without
    one, reads the file object."""
    fd = open_checked(spec, path, follow=follow)
    target = fd_path(fd)
    try:
        return av.open(target if target is not None else os.fdopen(os.dup(fd), "rb"))
    except (av.FFmpegError, OSError) as e:
        raise SourceError(f"{spec.label}: cannot open {spec.rel(path)}: {media_error(e)}") from e
    finally:
        os.close(fd)


def _open_media(spec: StreamSpec) -> av.container.InputContainer:
    return open_av(spec, spec.source)


def _demux_decode(spec: StreamSpec, container: av.container.InputContainer, stream: Any, what: str,
                  cpu: _CpuMeter | None = None) -> Iterator[Any]:
    """Decoded frames of ``stream``; :class:`SourceError` on corrupt data or a short file.

    The caller has already emitted every frame yielded before the error, so the good prefix
    of a damaged file still reaches the pipeline. ``cpu`` is charged with the demux and decode
    time (the consumer's work between frames is not).
    """
    packets = 0
    frames = 0
    cpu = cpu if cpu is not None else _CpuMeter()
    opened = False
    try:
        demux = container.demux(stream)
        while True:
            t0 = time.thread_time()
            packet = next(demux, None)
            if packet is None:
                cpu.decode_s += time.thread_time() - t0
                break
            if packet.size:  # the final flush packet is empty
                packets += 1
            if not opened:
                # PyAV opens the codec, and FFmpeg starts its decoder threads, at the first decode.
                before = _thread_ids()
                decoded = packet.decode()
                cpu.codec_threads.adopt(before)
                opened = True
            else:
                decoded = packet.decode()
            cpu.decode_s += time.thread_time() - t0
            for frame in decoded:
                frames += 1
                yield frame
    except (av.FFmpegError, OSError) as e:
        raise SourceError(f"{spec.label}: {what} decoding failed in {spec.rel(spec.source)} after {frames} frames: {media_error(e)}") from e
    finally:
        cpu.sample_threads()  # before the container closes and the threads with it
    # A file cut short after its index (moov first) demuxes without error; the index still
    # says how many packets there should have been.
    declared = stream.frames
    if declared and packets < declared:
        raise SourceError(f"{spec.label}: {spec.rel(spec.source)} is truncated: {packets} of {declared} {what} packets present")
    if frames == 0:
        raise SourceError(f"{spec.label}: no {what} frames decoded from {spec.rel(spec.source)}")


# What a frame source yields for a frame the selector skipped: its time, and this as the item.
SKIPPED = object()


def _chunked(chunker: _Chunker, samples: Iterator[tuple[float, Any]], select: Any = None) -> Iterator[Chunk]:
    """Chunks of ``samples``; on :class:`SourceError` the buffered tail is emitted first.
    An item ``SKIPPED`` is a frame left out by frame selection (only its time counts).
    While ``select`` (a frame selector) does not know the window grid yet, the first sample is
    a chunk of its own: the selector keeps every frame until then, the session's grid is fixed
    from every stream's first sample, and the frames after it can then be selected."""
    first_alone = select is not None and select.origin is None
    try:
        for t, item in samples:
            chunk = chunker.skip(t) if item is SKIPPED else chunker.add(t, item)
            if chunk is not None:
                yield chunk
            if first_alone:
                first_alone = False
                chunk = chunker.flush()
                if chunk is not None:
                    yield chunk
    except SourceError:
        tail = chunker.flush()
        if tail is not None:
            yield tail
        raise
    tail = chunker.flush()
    if tail is not None:
        yield tail


class Prefetch:
    """Iterates ``source`` in a thread of its own, at most ``depth`` items ahead of the consumer.

    Paced replay (``pipeline.reader.StreamReader``) holds each chunk until a live source could
    send it. Read inline, the next chunk would be decoded right after the previous one went out, i.e.
    just after a window end, when every session's windows reach the encoder at once and need
    the cores. Read here, decoding runs ahead in the slack:

    - ``holdoff_s``: while the consumer still holds an item, the next one is read no sooner
      than this long after the consumer last took one. The consumer takes items at window
      ends; half a chunk's period later the encoder's burst is over. A consumer that has
      nothing left is never kept waiting.
    - ``niceness`` is added to this thread (Linux sets it per thread; FFmpeg's decoder threads,
      started from it, inherit it), so what decoding still meets of the burst yields the cores.

    Items, then the source's end or its exception, come out in order. ``thread_s``: this
    thread's CPU seconds, once it has ended; ``close()`` stops it early. ``after_first``:
    called with no argument after the first item, it is polled (up to ``after_first_s``) until
    it returns true before reading on: a frame selector learns the window grid from the first
    chunk's reply, and frames read before it would all be kept.
    """

    _END = object()

    def __init__(self, source: Iterable[Any], depth: int = 2, niceness: int = 0, holdoff_s: float = 0.0,
                 after_first: Callable[[], bool] | None = None, after_first_s: float = 0.5) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not holdoff_s >= 0:
            raise ValueError(f"holdoff_s must be >= 0, got {holdoff_s}")
        self._source = source
        self._depth = depth
        self._niceness = niceness
        self._holdoff_s = holdoff_s
        self._after_first = after_first
        self._after_first_s = after_first_s
        self._items: collections.deque[Any] = collections.deque()
        self._cv = threading.Condition()
        self._taken_at: float | None = None  # time.monotonic() of the consumer's last take
        self._stop = False
        self.thread_s = 0.0
        self.niceness_applied = False
        self._thread = threading.Thread(target=self._work, name="source-prefetch", daemon=True)
        self._thread.start()

    def _renice(self) -> None:
        if self._niceness <= 0 or not hasattr(os, "setpriority"):
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self._niceness))
            self.niceness_applied = True
        except OSError as e:  # not permitted here: read at the process's priority
            logger.debug("prefetch: cannot renice thread %d: %s", tid, e)

    def _work(self) -> None:
        t0 = time.thread_time()
        try:
            self._renice()
            items = iter(self._source)  # the source opens and decodes in this thread
            first = True
            while self._wait_for_room():
                try:
                    item = next(items)
                except StopIteration:
                    self._put(self._END)
                    return
                self._put(item)
                if first and self._after_first is not None:
                    deadline = time.monotonic() + self._after_first_s
                    while not self._after_first() and time.monotonic() < deadline and not self._stop:
                        time.sleep(0.005)
                first = False
        except BaseException as e:  # delivered in order, after the items before it
            self._put(e)
        finally:
            self.thread_s = time.thread_time() - t0

    def _wait_for_room(self) -> bool:
        """Block until the next item may be read (room, and the hold-off over); false once closed."""
        with self._cv:
            while not self._stop:
                if len(self._items) >= self._depth:
                    self._cv.wait()
                    continue
                if not self._items or self._taken_at is None:
                    return True  # the consumer is waiting, or has not started: read now
                wait = self._taken_at + self._holdoff_s - time.monotonic()
                if wait <= 0:
                    return True
                self._cv.wait(wait)  # woken early when the consumer takes the last item
            return False

    def _put(self, x: Any) -> None:
        with self._cv:
            self._items.append(x)
            self._cv.notify_all()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._cv:
                while not self._items:
                    self._cv.wait()
                x = self._items.popleft()
                self._taken_at = time.monotonic()
                self._cv.notify_all()
            if x is self._END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (it ends after the item it is reading)."""
        with self._cv:
            self._stop = True
            self._items.clear()
            self._cv.notify_all()
        self._thread.join()
