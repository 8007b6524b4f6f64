"""Windowing on the session clock: the watermark rule, with no Ray and no wall clock inside.

The rule (also in ``docs/alignment.md``):

* The session clock is float64 seconds. The window grid starts at ``origin``: the configured
  value, or (``origin: auto``) the earliest first timestamp over all streams, fixed once every
  stream has produced a sample or ended; with ``phase``, moved back onto ``phase + m * hop`` (a
  live session's own phase on the run's shared clock; its first window is shorter, none lost).
* Window ``k`` ends at ``e_k = origin + (k + 1) * hop``. Windows are causal: every modality's
  span ends at ``e_k``, so a live window can be released as soon as its last second has arrived.
* Each modality takes its own span ending at ``e_k``: vision ``[e_k - 2, e_k)`` sampled to 2
  frames (first and last frame in the span, as ImageBind's uniform temporal subsample does),
  audio ``[e_k - 2, e_k)`` as 32000 samples at 16 kHz (zero-filled where the stream has no
  samples), IMU ``[e_k - 5, e_k)`` (raw samples; the encoder resamples to 2000), text
  ``[e_k - hop, e_k)`` (joined with spaces). Depth and thermal take the single frame nearest to
  ``e_k`` within ``tolerance`` seconds on either side.
* Stream ``s`` has *passed* time ``x`` when it has ended, or when its watermark (largest
  timestamp seen, or promised by a chunk's ``passed``: the time before which its source has no
  more samples) minus ``allowed_lateness`` is >= ``x``. Window ``k`` is released when every
  stream has passed the last time the window needs from it: ``e_k`` for span modalities,
  ``e_k + tolerance`` for nearest-frame modalities. Windows are released in index order.
* ``release: stream`` (the default) releases each stream's part of window ``k`` as soon as that
  stream has passed what the window needs from it, without waiting for the other streams: an
  audio embedding does not wait for a depth frame's tolerance, or for a slower stream's
  transport. Each stream's parts still come in index order, and a window's parts hold exactly
  the items the whole window would (the cut depends only on the stream's own samples). A stream
  that has ended gives its part of every window known to exist (one whose start some stream's
  samples have reached: the count the end rule would give now). ``release: window`` waits for
  every stream and releases the window whole. A window counts as released once every stream's
  part is.
* A sample older than ``watermark - allowed_lateness`` of its stream, or older than what the
  next unreleased window can still use, is dropped and counted as ``late``; one before the first
  window's reach (``e_0`` minus the span, or the tolerance) is not late: no window missed it. Non-finite
  timestamps are dropped as ``bad_timestamp``; a timestamp equal to one already buffered for
  that stream is dropped as ``duplicate``. Samples inside the lateness bound are re-sorted.
* A modality is present in a window when its stream has at least one sample in the span (two
  for IMU, one frame within tolerance for depth/thermal, one utterance for text); otherwise the
  window is released without it and lists the stream in ``missing``.
* When every stream has ended, windows are released up to the first one that ends after the
  latest timestamp seen: ``K = floor((t_last - origin) / hop) + 1`` windows in all.
* Live sessions only (``idle_after`` set): a stream that has fallen ``idle_after`` seconds
  behind the newest timestamp of any stream of the session is *idle*: it counts as having passed
  up to ``newest - idle_after`` (and stops holding back the origin), so a silent sensor delays
  the others by at most ``idle_after``. Its samples for windows already released are then
  dropped as ``late``. Replay never sets it: there, waiting is what makes delivery lossless.
* **Empty windows are bounded.** A stream releases at most ``max_empty_run`` (600) empty parts
  in a row; the rest of such a run is skipped in one step up to the next window that can hold
  one of its samples, counted in windows as ``<stream>:empty_windows`` (not ``missing``). So
  however far a stream's clock leaps (the guard follows a leap only after 2 s of samples at
  the stream's rate, sources/guard.py), that costs at most 600 empty parts, in bounded time.
* **Frames are bounded** (live: ``max_buffer_bytes`` = ``live.queue_bytes``): beyond it, the
  buffered depth/thermal frames no unreleased window can pick are dropped as ``thinned``
  (windows unchanged; at most two frames per window end, however fast frames come).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from sources.base import AUDIO_RATE, MODALITIES, Chunk

__all__ = ["ModalitySpan", "AlignConfig", "WindowItem", "Window", "Aligner", "DEFAULT_SPANS", "MAX_EMPTY_RUN", "window_end"]


@dataclass(frozen=True)
class ModalitySpan:
    """What one modality takes from the timeline for one window."""

    span: float = 0.0  # seconds ending at the window end (span modalities)
    tolerance: float | None = None  # set for nearest-frame modalities (depth, thermal)
    frames: int = 2  # vision only: frames sampled from the span

    @property
    def nearest(self) -> bool:
        return self.tolerance is not None

    def lookahead(self) -> float:
        """How far past the window end this modality needs its stream to have passed."""
        return self.tolerance if self.nearest else 0.0

    def lookback(self) -> float:
        """How far before the window end this modality can reach."""
        return self.tolerance if self.nearest else self.span


# ImageBind's training spans: 2 s clips of 2 frames for vision, 2 s audio clips, 5 s IMU
# (2000 samples at 400 Hz, Ego4D). Depth/thermal are single frames in ImageBind.
DEFAULT_SPANS: dict[str, ModalitySpan] = {
    "vision": ModalitySpan(span=2.0, frames=2),
    "audio": ModalitySpan(span=2.0),
    "imu": ModalitySpan(span=5.0),
    "depth": ModalitySpan(tolerance=0.5),
    "thermal": ModalitySpan(tolerance=0.5),
    "text": ModalitySpan(span=1.0),
}


MAX_EMPTY_RUN = 600  # a stream's empty parts released in a row before a run of them is skipped


@dataclass(frozen=True)
class AlignConfig:
    hop: float = 1.0
    origin: float | None = None  # None: earliest first timestamp over all streams
    allowed_lateness: float = 0.0
    spans: Mapping[str, ModalitySpan] = field(default_factory=lambda: dict(DEFAULT_SPANS))
    idle_after: float | None = None  # live only: see the module docstring
    release: str = "stream"  # "stream": each stream's part as soon as it is complete; "window": whole windows
    max_empty_run: int = MAX_EMPTY_RUN  # see the module docstring
    max_buffer_bytes: int | None = None  # live: over this, a nearest-frame stream is thinned (module docstring)
    phase: float | None = None  # auto origin only: moved back onto phase + m * hop (the module docstring)

    def __post_init__(self) -> None:
        if self.release not in ("stream", "window"):
            raise ValueError(f"window.release must be 'stream' or 'window', got {self.release!r}")
        if not (self.hop > 0 and math.isfinite(self.hop)):
            raise ValueError(f"window.hop must be a positive number of seconds, got {self.hop!r}")
        if self.allowed_lateness < 0:
            raise ValueError(f"window.allowed_lateness must be >= 0, got {self.allowed_lateness!r}")
        if self.idle_after is not None and not self.idle_after > 0:
            raise ValueError(f"idle_after must be a positive number of seconds, got {self.idle_after!r}")


@dataclass
class WindowItem:
    """One modality of one window, ready for its encoder."""

    session: str
    stream: str
    modality: str
    window: int
    t_start: float  # session clock seconds of the data used
    t_end: float
    payload: Any  # see encoders.preprocess.prepare for the layout per modality
    t_ingest: float  # wall time the newest sample used entered the pipeline
    t_first_ingest: float = float("nan")  # wall time the oldest sample used entered (window fill)


@dataclass
class Window:
    """Window ``index``, or with ``release: stream`` the part of it whose streams were released
    together: ``items`` and ``missing`` then cover only those streams."""

    session: str
    index: int
    t_end: float  # e_k
    items: list[WindowItem]
    missing: list[str]  # stream ids (of this part) with no data in this window


class _Rows:
    """A stream's buffered sample rows, kept as the arrays they arrived in.

    A chunk is never copied into one growing array: at rate 0 a fast stream runs seconds ahead
    of the slowest one, and concatenating its whole buffer again on every chunk cost the
    aligner a fifth of its CPU (py-spy, bench/RESULTS.md). Only the rows a window takes are
    gathered (text: object arrays of utterances). ``starts[i]`` is the first row of block ``i``;
    ``starts[-1]`` the row count.
    """

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.starts = np.zeros(1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def append(self, rows: np.ndarray) -> None:
        self.blocks.append(rows)
        self.starts = np.append(self.starts, self.starts[-1] + len(rows))

    def all(self) -> np.ndarray:
        return np.concatenate(self.blocks, axis=0) if len(self.blocks) != 1 else self.blocks[0]

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted indices), as a new array."""
        block = np.searchsorted(self.starts, idx, side="right") - 1
        if block[0] == block[-1]:
            return self.blocks[block[0]][idx - self.starts[block[0]]]
        return np.stack([self.blocks[b][i - self.starts[b]] for b, i in zip(block, idx)])

    def slice(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi``: a view where they lie in one block."""
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = int(np.searchsorted(self.starts, hi - 1, side="right")) - 1
        parts = [self.blocks[b][max(lo - self.starts[b], 0):hi - self.starts[b]] for b in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.blocks)

    def drop_front(self, n: int) -> None:
        whole = int(np.searchsorted(self.starts, n, side="right")) - 1  # blocks that end by row n
        self.blocks = self.blocks[whole:]
        self.starts = self.starts[whole:] - n
        if self.blocks and self.starts[0] < 0:
            self.blocks[0] = self.blocks[0][-self.starts[0]:]
            self.starts[0] = 0


class _StreamBuffer:
    """Time-sorted samples of one stream, with the wall time each chunk arrived."""

    def __init__(self, stream: str, modality: str) -> None:
        self.stream = stream
        self.modality = modality
        self.t = np.empty(0, dtype=np.float64)
        self.ingest = np.empty(0, dtype=np.float64)
        self.data = _Rows()  # text: object arrays of utterances
        self.watermark = -math.inf
        self.first: float | None = None
        self.ended = False
        self.error: str | None = None
        self.samples_in = 0

    def __len__(self) -> int:
        return len(self.t)

    def insert(self, t: np.ndarray, data: Any, ingest: float) -> None:
        if len(t) == 0:
            return
        in_order = not ((len(self.t) and t.min() < self.t[-1]) or np.any(np.diff(t) < 0))
        self.t = np.concatenate([self.t, t])
        self.ingest = np.concatenate([self.ingest, np.full(len(t), ingest, dtype=np.float64)])
        self.data.append(np.asarray(data, dtype=object) if self.modality == "text" else np.asarray(data))
        if not in_order:  # rare: samples inside the lateness bound, re-sorted
            order = np.argsort(self.t, kind="stable")
            self.t, self.ingest = self.t[order], self.ingest[order]
            rows = _Rows()
            rows.append(self.data.all()[order])
            self.data = rows

    def keep(self, idx: np.ndarray) -> None:
        """Keep only rows ``idx`` (sorted indices)."""
        rows = _Rows()
        if len(idx):
            rows.append(self.data.take(idx))
        self.t, self.ingest, self.data = self.t[idx], self.ingest[idx], rows

    def evict_before(self, t_keep: float) -> None:
        """Forget samples older than ``t_keep``; no unreleased window can use them."""
        n = int(np.searchsorted(self.t, t_keep, side="left"))
        if n == 0:
            return
        self.t = self.t[n:]
        self.ingest = self.ingest[n:]
        self.data.drop_front(n)

    def passed(self, x: float, lateness: float) -> bool:
        return self.ended or self.watermark - lateness >= x


class Aligner:
    """Lays the window grid over one session's streams and releases complete windows.

    ``push`` and ``end_stream`` return the windows they made releasable, in index order.
    ``clock`` (wall seconds) is injected so tests control ingest times.
    """

    def __init__(
        self,
        session: str,
        streams: Mapping[str, str],
        config: AlignConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.session = session
        self.config = config or AlignConfig()
        self.clock = clock or time.time
        for sid, modality in streams.items():
            if modality not in MODALITIES:
                raise ValueError(f"stream '{sid}': unknown modality {modality!r}")
            if modality not in self.config.spans:
                raise ValueError(f"stream '{sid}': no window span configured for {modality!r}")
        self._buffers = {sid: _StreamBuffer(sid, m) for sid, m in streams.items()}
        self.origin: float | None = self.config.origin
        self._next = {sid: 0 for sid in streams}  # per stream: its first unreleased window
        self._empty_run = {sid: 0 for sid in streams}  # per stream: empty parts released in a row
        self.dropped: Counter[tuple[str, str]] = Counter()  # (stream, reason) -> samples
        self.missing: Counter[str] = Counter()  # stream -> windows released without it
        self._t_last = -math.inf

    # -- input ---------------------------------------------------------------------------
    def push(self, chunk: Chunk) -> list[Window]:
        buf = self._buffers.get(chunk.stream)
        if buf is None:
            raise KeyError(f"session '{self.session}': unknown stream '{chunk.stream}'")
        if buf.ended:
            raise ValueError(f"session '{self.session}' stream '{chunk.stream}': chunk after end")
        t = np.asarray(chunk.t, dtype=np.float64)
        data = chunk.data
        n = len(t)
        if n == 0:
            # A watermark-only chunk (a paced replay source between sparse samples): no samples,
            # only the promise that none will come before ``passed``.
            if chunk.passed is not None and math.isfinite(chunk.passed):
                buf.watermark = max(buf.watermark, float(chunk.passed))
                return self._release()
            return []
        keep = self._placeable(buf, chunk.stream, t)
        if not keep.all():
            t = t[keep]
            data = [d for d, k in zip(data, keep) if k] if buf.modality == "text" else data[keep]
        if chunk.passed is not None and math.isfinite(chunk.passed):
            # The source's promise: no more samples before it. Not a sample: _t_last (the last
            # window at the end) stays with the real timestamps.
            buf.watermark = max(buf.watermark, float(chunk.passed))
        if len(t) == 0:
            return self._release()
        buf.samples_in += len(t)
        if buf.first is None:
            buf.first = float(t.min())
        buf.watermark = max(buf.watermark, float(t.max()))
        self._t_last = max(self._t_last, float(t.max()))
        buf.insert(t, data, chunk.t_ingest or self.clock())
        cap = self.config.max_buffer_bytes
        if cap and self.origin is not None and self.config.spans[buf.modality].nearest and buf.data.nbytes > cap:
            self._thin(buf)
        return self._release()

    def _thin(self, b: _StreamBuffer) -> None:
        """Drops (as ``thinned``) the frames no unreleased window can pick: a window takes the
        last frame before its end or the first after it, never one with no end between its
        two neighbours."""
        assert self.origin is not None
        t, hop, eps = b.t, self.config.hop, 1e-9
        n = len(t)
        if n < 3:
            return
        before = np.concatenate([[-np.inf], t[:-1]]) - eps
        after = np.concatenate([t[1:], [np.inf]]) + eps
        j = np.ceil((np.minimum(after, 1e300) - self.origin) / hop) - 2  # the last window ending before ``after``
        useful = (j >= self._next[b.stream]) & (self.origin + (j + 1) * hop > before)
        useful[0] = useful[-1] = True
        if useful.all():
            return
        self._count(b.stream, "thinned", int(n - useful.sum()))
        b.keep(np.flatnonzero(useful))

    def _placeable(self, buf: _StreamBuffer, stream: str, t: np.ndarray) -> np.ndarray:
        """Which of a chunk's times can be buffered: finite, not late, not a duplicate; the
        rest are counted by reason (``bad_timestamp``, ``late``, ``duplicate``)."""
        n = len(t)
        keep = np.isfinite(t)
        self._count(stream, "bad_timestamp", int(n - keep.sum()))
        lateness = self.config.allowed_lateness
        # Samples older than the lateness bound, or than anything an unreleased window can
        # still use, cannot be placed any more.
        floor = buf.watermark - lateness
        first_reach = -math.inf
        if self.origin is not None:
            floor = max(floor, self._earliest_needed(buf))
            # Before the first window's reach no window was ever missed: not late (paced
            # replay sends a stream's first sample alone, so the rest of its first chunk can
            # arrive once the grid is fixed). Buffered, then evicted like any unused sample.
            first_reach = self._window_end(0) - self.config.spans[buf.modality].lookback()
        late = keep & (t < floor) & (t >= first_reach)
        self._count(stream, "late", int(late.sum()))
        keep &= ~late
        # Duplicates of buffered timestamps, and repeats inside the chunk itself.
        if keep.any():
            dup = np.zeros(n, dtype=bool)
            if len(buf):
                pos = np.searchsorted(buf.t, t)
                pos_c = np.clip(pos, 0, len(buf.t) - 1)
                dup |= buf.t[pos_c] == t
            idx = np.flatnonzero(keep)
            tk = t[idx]
            if not np.all(tk[1:] > tk[:-1]):  # strictly increasing (the usual chunk): no repeats
                _, first = np.unique(tk, return_index=True)
                repeated = np.ones(len(idx), dtype=bool)
                repeated[first] = False
                dup[idx[repeated]] = True
            dup &= keep
            self._count(stream, "duplicate", int(dup.sum()))
            keep &= ~dup
        return keep

    def end_stream(self, stream: str, error: str | None = None) -> list[Window]:
        """Mark a stream finished (cleanly, or with ``error``); it stops holding windows."""
        buf = self._buffers[stream]
        buf.ended = True
        buf.error = error
        return self._release()

    # -- state ---------------------------------------------------------------------------
    @property
    def next_window(self) -> int:
        """The first window not yet released whole (some of its parts may be)."""
        return min(self._next.values(), default=0)

    @property
    def windows_released(self) -> int:
        """Windows every stream has released its part of."""
        return self.next_window

    @property
    def done(self) -> bool:
        """Every stream ended and every window released."""
        return all(b.ended for b in self._buffers.values()) and self._final_count() is not None and (
            self.next_window >= self._final_count()
        )

    def stream_errors(self) -> dict[str, str]:
        return {s: b.error for s, b in self._buffers.items() if b.error}

    def dropped_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.dropped.items():
            out[reason] += n
        return dict(out)

    def buffered_samples(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    # -- internals -----------------------------------------------------------------------
    def _count(self, stream: str, reason: str, n: int) -> None:
        if n:
            self.dropped[(stream, reason)] += n

    def _window_end(self, k: int) -> float:
        assert self.origin is not None
        return window_end(self.origin, self.config.hop, k)

    def _earliest_needed(self, b: _StreamBuffer) -> float:
        """The oldest time the stream's first unreleased window can use."""
        return self._window_end(self._next[b.stream]) - self.config.spans[b.modality].lookback()

    def _final_count(self) -> int | None:
        if not all(b.ended for b in self._buffers.values()):
            return None
        return self._known_count()

    def _known_count(self) -> int:
        """Windows known to exist (the final count once every stream has ended): up to the first
        ending after the latest sample, by :func:`window_end` as the cuts; a sample on an end is in the next."""
        if self.origin is None or not math.isfinite(self._t_last):
            return 0
        k = max(1, math.floor((self._t_last - self.origin) / self.config.hop) + 1)
        k += self._window_end(k - 1) <= self._t_last  # the division rounded down across an end
        return k - (k > 1 and self._window_end(k - 2) > self._t_last)  # or up across one

    def _idle_horizon(self) -> float:
        """Time up to which an idle stream counts as passed (live only; -inf otherwise)."""
        if self.config.idle_after is None or not math.isfinite(self._t_last):
            return -math.inf
        return self._t_last - self.config.idle_after

    def _fix_origin(self) -> bool:
        if self.origin is not None:
            return True
        bufs = self._buffers.values()
        horizon = self._idle_horizon()
        firsts = [b.first for b in bufs if b.first is not None]
        # A stream that stayed silent past the idle horizon does not hold back the grid (live).
        if firsts and (horizon >= min(firsts) or all(b.first is not None or b.ended for b in bufs)):
            phase, hop = self.config.phase, self.config.hop
            self.origin = min(firsts) if phase is None else phase + math.floor((min(firsts) - phase) / hop) * hop
            return True
        return False

    def _release(self) -> list[Window]:
        if not self._fix_origin():
            return []
        lateness = self.config.allowed_lateness
        final = self._final_count()
        horizon = self._idle_horizon()
        spans = self.config.spans
        bufs = self._buffers

        def ready(b: _StreamBuffer, k: int) -> bool:
            x = self._window_end(k) + spans[b.modality].lookahead()
            return b.passed(x, lateness) or horizon >= x

        whole_ready: dict[int, bool] = {}

        def whole(k: int) -> bool:
            if k not in whole_ready:
                whole_ready[k] = all(ready(b, k) for b in bufs.values())
            return whole_ready[k]

        by_stream = self.config.release == "stream"
        known = self._known_count()
        parts: dict[int, Window] = {}
        for b in bufs.values():

            def go(k: int, b: _StreamBuffer = b) -> bool:
                if not by_stream:
                    return whole(k)
                if b.ended:  # it has passed everything: its part of every window known to exist
                    return k < known
                return ready(b, k)

            self._release_stream(b, go, final, parts)
        return [parts[k] for k in sorted(parts)]

    def _release_stream(self, b: _StreamBuffer, go: Callable[[int], bool], final: int | None,
                        parts: dict[int, Window]) -> None:
        """Releases ``b``'s part of every window ``go`` allows, into ``parts``. After
        ``max_empty_run`` consecutive empty parts, a run of empty ones is skipped in one step
        (counted as ``empty_windows``) up to the next window that can hold a sample of the stream."""
        sid = b.stream
        k = self._next[sid]
        while (final is None or k < final) and go(k):
            e = self._window_end(k)
            item = self._cut(b, k, e)
            if item is None and self._empty_run[sid] >= self.config.max_empty_run:
                k = self._skip_empty(b, k, go, final)
                self._next[sid] = k
                b.evict_before(self._earliest_needed(b))
                continue
            w = parts.get(k)
            if w is None:
                w = parts[k] = Window(self.session, k, e, [], [])
            if item is None:
                w.missing.append(sid)
                self.missing[sid] += 1
                self._empty_run[sid] += 1
            else:
                w.items.append(item)
                self._empty_run[sid] = 0
            k += 1
            self._next[sid] = k
            b.evict_before(self._earliest_needed(b))

    def _skip_empty(self, b: _StreamBuffer, k: int, go: Callable[[int], bool], final: int | None) -> int:
        """The window after a run of ``b``'s empty parts starting at ``k`` (``go(k)`` holds):
        up to the first window that can hold ``b``'s next buffered sample, and no further than
        ``go`` allows (it is monotone in the window index: a binary search)."""
        assert self.origin is not None
        spec = self.config.spans[b.modality]
        limit = final if final is not None else math.inf
        i = int(np.searchsorted(b.t, self._window_end(k) - spec.lookback(), side="left"))
        if i < len(b):
            first = math.ceil((float(b.t[i]) - spec.lookahead() - self.origin) / self.config.hop) - 2
            limit = min(limit, max(k + 1, first))
        lo, step = k, 1  # go(lo) holds; find the last such window below limit
        while lo + step < limit and go(lo + step):
            lo, step = lo + step, step * 2
        hi = int(min(limit, lo + step))  # go(hi) fails, or hi is the limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if go(mid) else (lo, mid)
        self._count(b.stream, "empty_windows", lo + 1 - k)
        return lo + 1

    def _cut(self, b: _StreamBuffer, k: int, e: float) -> WindowItem | None:
        spec = self.config.spans[b.modality]

        def item(lo: int, hi: int, payload: Any, t0: float, t1: float) -> WindowItem:
            ing = b.ingest[lo:hi]
            return WindowItem(self.session, b.stream, b.modality, k, float(t0), float(t1), payload,
                              float(ing.max()), float(ing.min()))

        if spec.nearest:
            if not len(b):
                return None
            i = int(np.argmin(np.abs(b.t - e)))
            if abs(b.t[i] - e) > spec.tolerance:
                return None
            return item(i, i + 1, b.data.take(np.array([i]))[0], b.t[i], b.t[i])
        start = e - spec.span
        lo = int(np.searchsorted(b.t, start, side="left"))
        hi = int(np.searchsorted(b.t, e, side="left"))
        n = hi - lo
        if n == 0 or (b.modality == "imu" and n < 2):
            return None
        ts = b.t[lo:hi]
        if b.modality == "vision":
            pick = np.linspace(lo, hi - 1, spec.frames).round().astype(int)
            return item(lo, hi, np.ascontiguousarray(b.data.take(pick)), ts[0], ts[-1])
        if b.modality == "audio":
            n_out = int(round(spec.span * AUDIO_RATE))
            wave = np.zeros(n_out, dtype=np.float32)
            # Place each sample at its own offset in the span, so gaps stay gaps.
            pos = np.floor((ts - start) * AUDIO_RATE + 0.5).astype(np.int64)
            ok = (pos >= 0) & (pos < n_out)
            wave[pos[ok]] = b.data.slice(lo, hi)[ok]
            return item(lo, hi, wave, ts[0], ts[-1])
        if b.modality == "imu":
            rel = (ts - start)[:, None]
            payload = np.concatenate([rel, np.asarray(b.data.slice(lo, hi), dtype=np.float64)], axis=1)
            return item(lo, hi, payload, ts[0], ts[-1])
        if b.modality == "text":
            return item(lo, hi, " ".join(b.data.slice(lo, hi)), ts[0], ts[-1])
        raise AssertionError(b.modality)


def window_end(origin: float, hop: float, k: int) -> float:
    """``e_k``, computed one way everywhere (the aligner, the frame selector, paced replay), so
    their float comparisons agree exactly."""
    return origin + (k + 1) * hop
