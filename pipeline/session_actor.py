"""The session actor (:class:`AlignerActor`): one per session, in whose process the session's
streams are read (:mod:`pipeline.reader`). It holds the session's rules, each a plain class
tested on its own, and moves data between them, keeping work in flight bounded:

* a reader keeps at most ``max_inflight_chunks`` pushes outstanding, so a slow aligner holds
  it back (backpressure) instead of queueing decoded frames without limit;
* the actor keeps at most ``max_inflight_windows`` windows between release and publish, and
  makes ``push`` wait while it is full, which in turn holds its readers back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from pipeline.admission import LiveAdmission
from pipeline.align import AlignConfig, Aligner, Window, WindowItem
from pipeline.dispatch import EncoderDispatch, PublishLedger
from pipeline.encoder_link import EncoderLink
from pipeline.metrics import percentiles
from pipeline.observe import StageObserver
from pipeline.ordering import ChunkSequencer, PublishOrder, ReadyInOrder, ReleaseCoalescer, StreamEnd
from pipeline.publisher_link import PublisherLink
from pipeline.reader import ReaderHost
from pipeline.session_triggers import SessionTriggers, TriggerSetup
from pipeline.store_feed import StoreFeed
from pipeline.stats import SessionResult, SessionStats, merge_dropped
from sinks.protocol import EmbeddingRecord, ctl_topic, emb_topic, evt_topic

__all__ = ["AlignerActor"]

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class AlignerActor:
    """Windows one session, sends released items to the encoders, publishes each topic in window order.

    It also reads the session's ``sources``, each in a thread of this process
    (:meth:`source_run`, :class:`pipeline.reader.ReaderHost`): their chunks reach :meth:`push` by
    reference, without a Ray call. A crash of the process ends the whole session (the driver
    reports each stream, run.py).

    The rules are plain classes, each tested on its own; this actor holds them and moves data:
    chunks in order and stream ends (:class:`pipeline.ordering.ChunkSequencer`), windows
    (:class:`pipeline.align.Aligner`), coalesced releases (:class:`pipeline.ordering.ReleaseCoalescer`)
    or live admission (:class:`pipeline.admission.LiveAdmission`), encoder replicas and retries
    (:class:`pipeline.dispatch.EncoderDispatch`), publish order (:class:`pipeline.ordering.PublishOrder`),
    seqs across publisher restarts (:class:`pipeline.dispatch.PublishLedger`), the session's
    counters (:class:`pipeline.stats.SessionStats`), instrumentation (``observer``, a
    :class:`pipeline.observe.StageObserver` unless given) and, given a ``triggers`` setup, the
    session's triggers (:class:`pipeline.session_triggers.SessionTriggers`), evaluated on the
    embeddings as they are published, in publish order. Given ``store`` (the run keeps a store;
    ``{"thumbnails": bool}``), the published windows' captions and thumbnails go to the
    publisher's store writer (:class:`pipeline.store_feed.StoreFeed`). ``per_tower``: a release's
    rows come back tower by tower (:class:`pipeline.encoder_link.EncoderLink`)."""

    def __init__(
        self,
        session: str,
        streams: dict[str, str],
        align: AlignConfig,
        encoders: list[Any],
        publisher: Any,
        *,
        max_inflight_windows: int = 64,
        coalesce_ms: float = 0.0,
        heartbeat_s: float = 2.0,
        retries: int = 2,
        live: dict[str, Any] | None = None,
        publish_start: dict[str, Any] | None = None,
        sources: list[tuple[Any, dict[str, Any]]] | None = None,
        observer: Any = None,
        triggers: TriggerSetup | None = None, store: dict[str, Any] | None = None, per_tower: bool = True,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self.session = session
        self.streams = streams
        self._readers = ReaderHost(session, list(sources or []), self)  # (StreamSpec, options) each
        if live and live.get("idle_timeout_s"):
            # Live: a silent sensor holds the session's windows back at most this long.
            align = dataclasses.replace(align, idle_after=float(live["idle_timeout_s"]))
        if live and live.get("queue_bytes"):
            # Live: frames of a nearest-frame stream beyond its byte budget are thinned (docs/live.md).
            align = dataclasses.replace(align, max_buffer_bytes=int(live["queue_bytes"]))
        self.aligner = Aligner(session, streams, align)
        self.encoders = encoders
        self.publisher = publisher
        self.max_inflight = max_inflight_windows
        self.heartbeat_s = heartbeat_s
        self.restart_timeout_s = 120.0  # how long a call waits for a restarting encoder or publisher
        self._order: ChunkSequencer[Any] = ChunkSequencer()
        # Replay: releases within coalesce_ms of the first go to an encoder in one call.
        self._coalesce = ReleaseCoalescer(0.0 if live else float(coalesce_ms) / 1000.0)
        self._admission = LiveAdmission.from_options(live) if live else None  # bounded latency (docs/live.md)
        self._publish_order = PublishOrder()
        self._ctl_topic = ctl_topic(session)
        self.stats = SessionStats(session)
        self.observer = observer if observer is not None else StageObserver(session)
        self._triggers = SessionTriggers(session, triggers) if triggers is not None else None
        self._store = StoreFeed(str((publish_start or {}).get("model", "")), self._store_rows, **store) if store else None
        self._encoding = EncoderLink(session, encoders, EncoderDispatch(len(encoders), retries, self.restart_timeout_s),
                                     self.observer, per_tower)
        # model, dim and start seqs: what a restarted publisher needs (pipeline.publisher_link)
        self._publisher = PublisherLink(session, streams, publisher, dict(publish_start or {}),
                                        self.restart_timeout_s, self.stats.publisher_lost)
        # (item, rows future, row) of each released window until published (ReadyInOrder's rule)
        self._pending: ReadyInOrder = ReadyInOrder(lambda e: e[0].modality, lambda e: e[1].done(), align.release == "window")
        self._pending_changed: asyncio.Event | None = None
        self._pump_task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._done: asyncio.Event | None = None
        self._finished = False
        self._interrupted = False  # see source_stop
        # np.percentile imports numpy.ma on its first call (tenths of a second on a loaded
        # machine): paid here, not by the first heartbeat on the event loop that takes pushes.
        percentiles([0.0])

    # -- the session's sources, read in threads of this process (pipeline.reader) -----------
    async def source_ready(self, stream: str) -> int:
        """:meth:`pipeline.reader.StreamReader.ready` for ``stream``; returns the process id."""
        return await self._readers.ready(stream)

    async def source_run(self, stream: str, rate: float, max_inflight: int,
                         start_at: float | None = None) -> dict[str, Any]:
        """Read ``stream`` to its end (:meth:`pipeline.reader.StreamReader.run`); returns its end stats."""
        return await self._readers.run(stream, rate, max_inflight, start_at)

    async def source_stop(self, stream: str, interrupted: bool = False) -> None:
        """Stop reading ``stream``. ``interrupted``: the run was stopped before the stream's end
        (a replay stopped by Ctrl-C/SIGTERM), which the session's ``end`` and summary then say."""
        self._interrupted = self._interrupted or interrupted
        self._readers.stop(stream)

    def pid(self) -> int:
        """The process id of the session: its aligner and its readers (fault tests kill it)."""
        return os.getpid()

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if self._pump_task is None:
            self._pending_changed = asyncio.Event()
            self._done = asyncio.Event()
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())
            self._hb_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def push(self, chunk: Any, seq: int) -> float | None:
        """Apply ``chunk`` (the ``seq``-th of its stream); returns the session's window origin
        once it is fixed (the sources' frame selectors need it), else ``None``."""
        self._ensure_tasks()
        self._apply(self._order.push(chunk.stream, seq, chunk))
        # Backpressure: the source waits on this call while too much is in flight.
        while len(self._pending) > self.max_inflight and not self._finished:  # finished: publisher lost
            self._pending_changed.clear()
            await self._pending_changed.wait()
        return self.aligner.origin

    async def wait_origin(self, timeout_s: float) -> float | None:
        """The session's window origin, waiting up to ``timeout_s`` for it to be fixed."""
        deadline = time.monotonic() + timeout_s
        while self.aligner.origin is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.aligner.origin

    async def end_stream(self, stream: str, error: str | None = None, dropped: dict[str, int] | None = None,
                         chunks: int = 0) -> None:
        """The stream sent ``chunks`` chunks and stops (with ``error`` when its reader failed);
        it ends once they are all applied."""
        self._ensure_tasks()
        if self._order.ended(stream):
            return
        self.stats.stream_ended(stream, error, dropped)
        self._apply(self._order.end(stream, chunks, error))

    def _apply(self, steps: list[Any]) -> None:
        """Chunks and stream ends, in order, to the aligner; what it releases to the encoders."""
        for step in steps:
            if isinstance(step, StreamEnd):
                self._dispatch(self.aligner.end_stream(step.stream, step.error))
                self._pending_changed.set()
            else:
                self._dispatch(self.aligner.push(step))

    async def wait_done(self) -> dict[str, Any]:
        self._ensure_tasks()
        await self._done.wait()
        return self.summary()

    async def connect(self) -> dict[str, Any]:
        """Call every encoder and the publisher once before the run, so the first windows do not
        pay for setting up those connections; returns :meth:`progress`."""
        await asyncio.gather(*(e.info.remote() for e in self.encoders), self.publisher.pid.remote(),
                             return_exceptions=True)  # a dead actor is the run's business, reported there
        return self.progress()

    def progress(self) -> dict[str, Any]:
        return {
            "windows": self.aligner.windows_released,
            "published": self.stats.published,
            "pending": len(self._pending),
            "done": self._finished,
        }

    def result(self) -> SessionResult:
        return self.stats.result(windows=self.aligner.windows_released, dropped=self._dropped(),
                                 missing=self.aligner.missing, encode_retries=self._encoding.dispatch.retries_done,
                                 publisher_restarts=self._publisher.ledger.restarts, stages=self.observer.summary(),
                                 triggers=self._triggers.summary() if self._triggers else None,
                                 interrupted=self._interrupted)

    def timeline(self) -> dict[str, Any] | None:
        """What the session timeline draws (``timeline`` in the config), once the session is done."""
        return self._triggers.timeline() if self._triggers else None

    def summary(self) -> dict[str, Any]:
        """:meth:`result` as the run's session summary (``RunResult.sessions``)."""
        return self.result().to_dict()

    def _dropped(self) -> dict[str, int]:
        return merge_dropped(self.aligner.dropped, self.stats.source_dropped,
                             self._publish_order.dropped, self._admission.dropped if self._admission else {},
                             self._encoding.dispatch.dropped())

    # -- release -> encode -----------------------------------------------------------------
    def _dispatch(self, windows: list[Window]) -> None:
        if self._admission is not None:
            self._admission.offer(windows)  # live: admitted by _live_feed, which may shed
            self._live_feed()
            return
        first = self._coalesce.deadline is None
        now_ready = self._coalesce.add(windows, time.monotonic())
        if now_ready:
            self._send(now_ready)
        elif first and self._coalesce.held:
            asyncio.get_running_loop().call_later(self._coalesce.window_s, self._flush_coalesced)

    def _flush_coalesced(self) -> None:
        self._send(self._coalesce.flush())

    def _live_feed(self) -> None:
        admitted = self._admission.admit(time.time())
        if admitted:
            self._send(admitted)

    def _send(self, windows: list[Window]) -> None:
        """One encoder call for every item of ``windows``; each window queued for publishing."""
        by_modality: dict[str, list[WindowItem]] = collections.defaultdict(list)
        for w in windows:
            for item in w.items:
                by_modality[item.modality].append(item)
        # Per modality a future of its rows, set as its tower answers; windows that hold
        # nothing (no caption in them, say) make no call.
        futs = self._encoding.start(dict(by_modality)) if by_modality else {}
        for fut in futs.values():
            fut.add_done_callback(self._rows_came)
        row = {id(item): i for items in by_modality.values() for i, item in enumerate(items)}
        t_release = time.time()
        for w in windows:
            self._pending.add(w, [(item, futs[item.modality], row[id(item)]) for item in w.items])
            self.observer.released(w.items, t_release)
        self._pending_changed.set()

    def _rows_came(self, _fut: asyncio.Future) -> None:
        self._pending_changed.set()

    # -- publish ---------------------------------------------------------------------------
    async def _pump(self) -> None:
        while True:
            if self._admission is not None:
                self._live_feed()
            if not self._pending:
                if self.aligner.done and not self._coalesce.held:
                    break
                self._pending_changed.clear()
                await self._pending_changed.wait()
                continue
            records, items = await self._collect()
            self._pending_changed.set()
            if records and not await self._publish(records, items):
                break  # the publisher is gone for good: the session ends with the error
        await self._finish()

    async def _collect(self) -> tuple[list[Any], list[WindowItem]]:
        """What may be published now (:class:`pipeline.ordering.ReadyInOrder`): the records,
        and the items behind them. Waits until something is."""
        while True:
            entries, done = self._pending.take()
            if entries or done:
                break
            self._pending_changed.clear()
            await self._pending_changed.wait()
        now = time.time()
        if self._admission is not None:
            for w in done:
                self._admission.served(w, now)
        records: list[Any] = []
        items: list[WindowItem] = []
        for item, fut, row in entries:
            emb = fut.result()[row]
            if not self._publishable(item, emb, now):
                self.observer.discarded([item])
                continue
            items.append(item)
            records.append(EmbeddingRecord(
                session=self.session, stream=item.stream, modality=item.modality,
                window=item.window, t_start=item.t_start, t_end=item.t_end,
                embedding=np.asarray(emb, dtype=np.float32), t_ingest=item.t_ingest,
            ))
        return records, items

    def _publishable(self, item: WindowItem, emb: Any, now: float) -> bool:
        """No encoder error, within a live session's bound, and never a window twice."""
        if emb is None:
            return False
        if self._admission is not None and self._admission.late(item, now):
            return False  # would break the latency bound: counted, not published
        return self._publish_order.admit(item.stream, item.window)

    async def _publish(self, records: list[Any], items: list[WindowItem]) -> bool:
        claims = PublishLedger.count(emb_topic(r.session, r.modality) for r in records)
        if not await self._publisher.call("publish", records, claims=claims):
            return False
        t_pub = time.time()
        self.observer.published(items, t_pub)
        self.stats.record_published(((r.modality, r.t_ingest) for r in records), t_pub)
        if self._store is not None:
            self._store.add(records, items)
        return await self._publish_events(self._triggers.observe(records, items)) if self._triggers else True

    async def _publish_events(self, events: list[Any]) -> bool:
        """Trigger events on ``evt/<session>/<trigger>``, after the embeddings that made them."""
        if not events:
            return True
        claims = PublishLedger.count(evt_topic(self.session, e.trigger) for e in events)
        return await self._publisher.call("publish_events", self.session, events, claims=claims)

    async def _store_rows(self, rows: list[Any]) -> None:
        await self.publisher.store_rows.remote(rows)

    async def _finish(self) -> None:
        # The last gauges and drop counts: a session shorter than heartbeat_s has had no tick yet,
        # and drops since the last one would be lost.
        self._tick()
        if self._triggers is not None and self.stats.publisher_error is None:
            await self._publish_events(self._triggers.close())  # events still on end with the session
        if self._store is not None:
            await self._store.drain()  # the session's end reports its thumbnails and captions too
        if self.stats.publisher_error is None:
            await self._publisher.call(
                "end_session",
                self.session,
                counts=dict(self.stats.counts),
                windows=self.aligner.windows_released,
                dropped=self._dropped(),
                missing=dict(self.aligner.missing),
                errors=dict(self.stats.errors),
                **({"interrupted": True} if self._interrupted else {}),  # docs/protocol.md
                claims={self._ctl_topic: 1},
            )
        self._finished = True
        self._pending_changed.set()  # releases pushes held by backpressure (publisher lost)
        if self._hb_task:
            self._hb_task.cancel()
        self._done.set()

    def _tick(self) -> dict[str, Any]:
        return self.observer.tick(len(self._pending), self._dropped())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self._finished or self.stats.publisher_error is not None:
                return
            try:
                await self._publisher.call("heartbeat", self.session, {
                    "windows": self.aligner.windows_released,
                    "counts": dict(self.stats.counts),
                    "dropped": self._dropped(),
                    "pending": len(self._pending),
                    "buffered_samples": self.aligner.buffered_samples(),
                    **self._tick(),
                }, claims={self._ctl_topic: 1})
            except Exception as exc:
                log.warning("session '%s': heartbeat failed: %s", self.session, exc)
