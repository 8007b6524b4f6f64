"""Instrumentation of an aligner beside its data path: one observer, called at a few points.

The aligner tells its observer when items are ``released`` (sent to an encoder),
``forwarded`` (their batch's forward span is known), ``published`` or ``discarded`` (never to
be published), and calls :meth:`StageObserver.tick` with its gauges every heartbeat. The
observer keeps the stage stamps (:class:`pipeline.metrics.StageRecorder`, docs of the stages
in :mod:`pipeline.metrics`) and exports Ray metrics (:class:`pipeline.metrics.RayMetrics`).
:class:`NullObserver` does nothing, for runs and tests that want no instrumentation.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Mapping, Sequence

from pipeline.metrics import RayMetrics, StageRecorder

__all__ = ["NullObserver", "StageObserver"]


class NullObserver:
    def released(self, items: Iterable[Any], t_release: float) -> None:
        pass

    def forwarded(self, items: Sequence[Any], spans: Sequence[tuple[float, float]]) -> None:
        pass

    def published(self, items: Iterable[Any], t_pub: float) -> None:
        pass

    def discarded(self, items: Iterable[Any]) -> None:
        pass

    def tick(self, pending: int, dropped: Mapping[str, int]) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


class StageObserver(NullObserver):
    """Stage timing of every published item of one session, and the session's Ray metrics.

    ``metrics``: a :class:`RayMetrics` (made here when ``None``; pass one built elsewhere, or
    one whose export is off, in tests). Memory is bounded: stamps are kept only for items
    between release and publish, samples for the last ``keep`` items.
    """

    def __init__(self, session: str, metrics: RayMetrics | None = None, keep: int = 20_000) -> None:
        self.session = session
        self.metrics = metrics if metrics is not None else RayMetrics()
        self.stages = StageRecorder(keep=keep, metrics=self.metrics, session=session)
        self._stamps: dict[int, list[float]] = {}  # id(item) -> [t_release, t_fwd0, t_fwd1]
        self._exported: collections.Counter[str] = collections.Counter()  # drops already exported

    @property
    def tracked(self) -> int:
        """Items between release and publish."""
        return len(self._stamps)

    def released(self, items: Iterable[Any], t_release: float) -> None:
        for item in items:
            self._stamps[id(item)] = [t_release, math.nan, math.nan]

    def forwarded(self, items: Sequence[Any], spans: Sequence[tuple[float, float]]) -> None:
        for item, (t0, t1) in zip(items, spans):
            st = self._stamps.get(id(item))
            if st is not None:
                st[1], st[2] = t0, t1

    def published(self, items: Iterable[Any], t_pub: float) -> None:
        by_modality: collections.Counter[str] = collections.Counter()
        for item in items:
            st = self._stamps.pop(id(item), None)
            by_modality[item.modality] += 1
            if st is not None:
                self.stages.record(item.t_ingest, st[0], st[1], st[2], t_pub, t_first_ingest=item.t_first_ingest)
        self.metrics.embeddings(self.session, by_modality)

    def discarded(self, items: Iterable[Any]) -> None:
        for item in items:
            self._stamps.pop(id(item), None)

    def tick(self, pending: int, dropped: Mapping[str, int]) -> dict[str, Any]:
        """Export the gauges and the drops since the last tick; the heartbeat's stage summary."""
        self.metrics.pending(self.session, pending)
        for reason, n in dropped.items():
            delta = n - self._exported[reason]
            if delta > 0:
                self.metrics.dropped(self.session, reason, delta)
                self._exported[reason] = n
        return {"latency": self.stages.brief()}

    def summary(self) -> dict[str, Any]:
        return self.stages.summary()
