"""Order rules of one session's aligner, as plain classes (no Ray, no event loop, no clock read).

* :class:`ChunkSequencer`: chunks reach the aligner strictly in per-stream ``seq`` order, and
  a stream ends once every chunk it announced has been applied.
* :class:`ReleaseCoalescer`: releases within ``window_s`` of the first share one encoder call.
* :class:`PublishOrder`: a stream's windows are published in increasing order, each once.
* :class:`ReadyInOrder`: released windows between release and publish; what may go out now.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sized, TypeVar

__all__ = ["ChunkSequencer", "PublishOrder", "ReadyInOrder", "ReleaseCoalescer", "StreamEnd"]

C = TypeVar("C", bound=Sized)
E = TypeVar("E")


@dataclass(frozen=True)
class StreamEnd:
    """Step of :class:`ChunkSequencer`: end ``stream`` at the aligner (with its source's error)."""

    stream: str
    error: str | None


class ChunkSequencer(Generic[C]):
    """Puts each stream's chunks back in ``seq`` order and says when the stream ends.

    An async actor may start calls out of submission order, so each chunk carries its
    stream's sequence number (0, 1, ...). :meth:`push` and :meth:`end` return the steps to
    apply now, in order: chunks, then at most one :class:`StreamEnd`.

    The end rule: a reader announces how many chunks it sent (:meth:`end`); the stream ends
    once all of them have been applied. A second end of an ended stream is ignored. A reader
    runs in its session's process, so it cannot die without the session: there is no end with
    an unknown count, and a chunk after the end is a bug (ValueError).
    """

    def __init__(self) -> None:
        self._held: dict[str, dict[int, C]] = collections.defaultdict(dict)
        self._next: collections.Counter[str] = collections.Counter()
        self._ends: dict[str, tuple[int, str | None]] = {}  # announced, not yet applied
        self._ended: set[str] = set()

    def ended(self, stream: str) -> bool:
        return stream in self._ended

    def next_seq(self, stream: str) -> int:
        """The seq of the stream's next chunk to apply (= chunks applied so far)."""
        return self._next[stream]

    def push(self, stream: str, seq: int, chunk: C) -> list[C | StreamEnd]:
        if stream in self._ended or (stream in self._ends and seq >= self._ends[stream][0]):
            raise ValueError(f"stream '{stream}': chunk {seq} after its announced end")
        held = self._held[stream]
        held[seq] = chunk
        nxt = self._next[stream]
        steps: list[C | StreamEnd] = []
        while nxt in held:
            steps.append(held.pop(nxt))
            nxt += 1
        self._next[stream] = nxt
        return steps + self._maybe_end(stream)

    def end(self, stream: str, chunks: int, error: str | None = None) -> list[C | StreamEnd]:
        """The stream sent ``chunks`` chunks and stops."""
        if stream in self._ended or stream in self._ends:
            return []
        self._ends[stream] = (chunks, error)
        return self._maybe_end(stream)

    def _maybe_end(self, stream: str) -> list[C | StreamEnd]:
        end = self._ends.get(stream)
        if end is None or self._next[stream] < end[0]:
            return []  # chunks still on their way
        del self._ends[stream]
        self._ended.add(stream)
        self._held.pop(stream, None)
        return [StreamEnd(stream, end[1])]


class ReleaseCoalescer:
    """Releases that arrive within ``window_s`` of the first one held are sent together.

    Streams that complete a window together (audio and IMU at its end, say) arrive as separate
    pushes a few ms apart; held this long, their parts share one encoder call (one Ray round
    trip, in the window-end burst where every core is busy). ``window_s = 0`` holds nothing.
    Times are the caller's clock, in seconds.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = max(0.0, float(window_s))
        self._held: list[Any] = []
        self.deadline: float | None = None  # when the held windows are due

    @property
    def held(self) -> int:
        return len(self._held)

    def add(self, windows: list[Any], now: float) -> list[Any]:
        """The windows to send now: ``windows`` when nothing is held back, else none (they
        join the held group; the first of a group sets :attr:`deadline`)."""
        if self.window_s <= 0:
            return list(windows)
        if windows and self.deadline is None:
            self.deadline = now + self.window_s
        self._held.extend(windows)
        return []

    def due(self, now: float) -> list[Any]:
        """The held windows once the deadline has passed, else none."""
        if self.deadline is None or now < self.deadline:
            return []
        return self.flush()

    def flush(self) -> list[Any]:
        """Every held window, at once (a timer armed for :attr:`deadline` fired, or the end)."""
        out, self._held, self.deadline = self._held, [], None
        return out


class PublishOrder:
    """Never publishes a window at or below the newest one published for its stream.

    Windows go out in index order per stream, so one at or below the last is a duplicate
    (a batch re-sent after an encoder restart, a window released twice upstream): it is
    dropped and counted in :attr:`dropped` as ``<stream>:duplicate_window``. Delivery stays
    exactly-once whatever happened upstream.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.dropped: collections.Counter[str] = collections.Counter()

    def admit(self, stream: str, window: int) -> bool:
        if window <= self._last.get(stream, -1):
            self.dropped[f"{stream}:duplicate_window"] += 1
            return False
        self._last[stream] = window
        return True


class ReadyInOrder(Generic[E]):
    """The windows released and not yet published, in release order, and what may go out now.

    Each window holds entries (one per item: a stream's part of the window), each with a
    ``key`` (its topic: the modality) and a ``ready`` test (its embedding has come back). Per
    key (``together=False``, ``window.release: stream``): an entry goes as soon as it is ready
    and every earlier entry of its key has gone, so each topic keeps its release order while a
    topic whose tower answered first does not wait for slower towers.
    Whole windows (``together=True``, ``window.release: window``): a window goes once all its
    entries are ready, windows in order. ``len()`` counts the windows that still hold an entry.
    """

    def __init__(self, key: Callable[[E], str], ready: Callable[[E], bool], together: bool = False) -> None:
        self._key, self._ready, self.together = key, ready, together
        self._windows: collections.deque[tuple[Any, list[E]]] = collections.deque()

    def __len__(self) -> int:
        return len(self._windows)

    def add(self, window: Any, entries: list[E]) -> None:
        self._windows.append((window, list(entries)))

    def take(self) -> tuple[list[E], list[Any]]:
        """The entries that may go out now, in order, and the windows that have no entry left."""
        return self._take_whole() if self.together else self._take_per_key()

    def _take_whole(self) -> tuple[list[E], list[Any]]:
        out: list[E] = []
        done: list[Any] = []
        while self._windows and all(self._ready(e) for e in self._windows[0][1]):
            window, entries = self._windows.popleft()
            out.extend(entries)
            done.append(window)
        return out, done

    def _take_per_key(self) -> tuple[list[E], list[Any]]:
        out: list[E] = []
        done: list[Any] = []
        blocked: set[str] = set()  # keys with an earlier entry still waiting
        kept: collections.deque[tuple[Any, list[E]]] = collections.deque()
        for window, entries in self._windows:
            left = []
            for e in entries:
                k = self._key(e)
                if k not in blocked and self._ready(e):
                    out.append(e)
                else:
                    blocked.add(k)
                    left.append(e)
            if left:
                kept.append((window, left))
            else:
                done.append(window)
        self._windows = kept
        return out, done
