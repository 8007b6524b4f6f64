"""Live sessions: bounded publish latency by admission and shedding (docs/live.md).

A plain class with the clock passed in (``now``, wall-clock seconds, the clock of the items'
``t_ingest``); no Ray, no event loop. The rule:

* Released windows wait in a backlog; at most ``inflight`` windows are between dispatch and
  publish (:meth:`LiveAdmission.admit`). The cap counts windows: with ``release: stream`` a
  window comes in several parts, and a part of a window already in flight is always admitted.
* Before admitting a window, its expected publish latency is its age (now minus its newest
  item's ``t_ingest``) plus the recent dispatch-to-publish time (an EWMA, ``served_s``). A
  window expected past ``max_latency_s`` is shed, oldest first, each item counted per stream
  as ``shed_latency``.
* With ``shed: subsample``, once half the bound is used the ``subsample`` modalities of every
  other window (odd indices: the same for all parts of a window) are dropped, counted as
  ``subsampled``; the rest of the window is admitted.
* A stall (a publisher restart) leaves ``served_s`` high, and with nothing in flight nothing
  would refresh it: every window would be shed from then on. So while nothing is in flight, a
  window shed only because of the estimate (its age alone is within the bound) halves it.
* A result older than 90 % of the bound when its turn to publish comes is dropped as
  ``late_publish`` (:meth:`late`): the rest is left for the publish call and the socket.

``max_latency_s = 0`` turns shedding off; the cap still holds.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

__all__ = ["LiveAdmission"]


class LiveAdmission:
    def __init__(self, max_latency_s: float = 0.0, inflight: int = 2, shed: str = "drop_oldest",
                 subsample: Iterable[str] = ()) -> None:
        self.bound = max(0.0, float(max_latency_s or 0.0))
        self.cap = max(1, int(inflight))
        self.subsample = set(subsample) if shed == "subsample" else set()
        self.served_s = 0.0  # EWMA of dispatch -> publish time of one window
        self.dropped: collections.Counter[str] = collections.Counter()  # "<stream>:<reason>"
        self._backlog: collections.deque[Any] = collections.deque()
        self._inflight: dict[int, tuple[Any, float]] = {}  # id(window) -> (window, dispatched at)

    @classmethod
    def from_options(cls, live: Mapping[str, Any]) -> "LiveAdmission":
        """From the aligner's ``live`` options (``max_latency_s``, ``inflight``, ``shed``, ``subsample``)."""
        return cls(max_latency_s=float(live.get("max_latency_s") or 0.0), inflight=int(live.get("inflight", 2)),
                   shed=str(live.get("shed") or "drop_oldest"), subsample=live.get("subsample") or ())

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def offer(self, windows: Iterable[Any]) -> None:
        """Released windows join the backlog."""
        self._backlog.extend(windows)

    @staticmethod
    def age(window: Any, now: float) -> float:
        """Seconds since the window's newest item entered the pipeline."""
        return now - max((it.t_ingest for it in window.items), default=now)

    def admit(self, now: float) -> list[Any]:
        """The windows to dispatch now, oldest first; shed ones are counted and forgotten."""
        busy = {w.index for w, _ in self._inflight.values()}
        admitted: list[Any] = []
        while self._backlog and (len(busy) < self.cap or self._backlog[0].index in busy):
            w = self._backlog.popleft()
            if self.bound > 0 and not self._keep(w, now, stalled=not self._inflight and not admitted):
                continue
            admitted.append(w)
            busy.add(w.index)
            self._inflight[id(w)] = (w, now)
        return admitted

    def _keep(self, w: Any, now: float, stalled: bool) -> bool:
        """Whether ``w`` can still make the bound; sheds it, or its subsampled items, if not."""
        age = self.age(w, now)
        expected = age + self.served_s
        if expected > self.bound:
            for it in w.items:
                self.dropped[f"{it.stream}:shed_latency"] += 1
            if stalled and age <= self.bound:
                self.served_s *= 0.5
            return False
        if self.subsample and expected > self.bound / 2 and w.index % 2:
            for it in w.items:
                if it.modality in self.subsample:
                    self.dropped[f"{it.stream}:subsampled"] += 1
            w.items = [it for it in w.items if it.modality not in self.subsample]
        return True

    def served(self, window: Any, now: float) -> None:
        """``window``'s results are in (its turn to publish came): it leaves the cap and
        updates the dispatch-to-publish estimate."""
        entry = self._inflight.pop(id(window), None)
        if entry is not None:
            self.served_s = 0.7 * self.served_s + 0.3 * (now - entry[1])

    def late(self, item: Any, now: float) -> bool:
        """True (and counted as ``late_publish``) when ``item`` is too old to publish."""
        if self.bound > 0 and now - item.t_ingest > 0.9 * self.bound:
            self.dropped[f"{item.stream}:late_publish"] += 1
            return True
        return False
