"""The Ray actors of the graph: one aligner per session, encoders, the publisher.

A session's streams are read in threads of its aligner's process (:mod:`pipeline.reader`).
The logic lives elsewhere (``sources/`` read, :mod:`pipeline.align` windows,
:mod:`pipeline.batching` batches, ``encoders/`` embed, ``sinks/`` publish); these classes only
move data between them and keep work in flight bounded:

* a reader keeps at most ``max_inflight_chunks`` pushes outstanding, so a slow aligner holds
  it back (backpressure) instead of queueing decoded frames without limit;
* an aligner keeps at most ``max_inflight_windows`` windows between release and publish, and
  makes ``push`` wait while it is full, which in turn holds its sources back;
* an encoder batches items per tower across every caller (windows and sessions).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from pipeline.admission import LiveAdmission
from pipeline.align import AlignConfig, Aligner, Window, WindowItem
from pipeline.batching import TowerBatcher
from pipeline.dispatch import EncoderDispatch, PublishLedger, backoff_s
from pipeline.metrics import percentiles
from pipeline.observe import StageObserver
from pipeline.ordering import ChunkSequencer, PublishOrder, ReleaseCoalescer, StreamEnd
from pipeline.reader import ReaderHost
from pipeline.stats import SessionResult, SessionStats, merge_dropped
from sinks.protocol import EmbeddingRecord, ctl_topic, emb_topic

__all__ = ["AlignerActor", "EncoderActor", "PublisherActor", "PublisherRestartedError"]

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class EncoderActor:
    """Holds one model; batches items per tower across all callers; returns unit-norm rows.
    ``imu_span``: the seconds an IMU window covers (``window.spans.imu.span``), over which its
    samples are resampled into the tower's; ``None``: the tower's own duration."""

    def __init__(self, model_options: dict[str, Any], max_batch: int, max_wait_ms: float,
                 prepare_ahead: bool = False, imu_span: float | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        import torch

        from encoders.imagebind import load

        threads = int(model_options.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = model_options["device"]
        self.model = load(
            model_options["config"],
            model_options["checkpoint"],
            device=device,
            precision=model_options["precision"],
            compile=bool(model_options.get("compile", False)),
            seed=int(model_options.get("seed", 0)),
        )
        self.device = torch.device(device)
        self.imu_span = imu_span
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # One thread runs the model, so towers never compete for the device or the cores; a
        # tower's batch is formed when the batcher's runner is free (pipeline/batching.py).
        # prepare_ahead: a second thread preprocesses the next batch while the model runs this
        # one (at most one batch waits, prepared, for the model thread).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") if prepare_ahead else None
        self._batcher = TowerBatcher(self._run_staged if prepare_ahead else self._run_batch, max_batch=max_batch,
                                     max_wait_s=self.max_wait_s, name="encoder",
                                     prepare=self._prepare_batch if prepare_ahead else None)
        self._metrics: Any = None  # pipeline.metrics.RayMetrics, made in warmup() (or on the first batch)
        self.items = collections.Counter()
        self.forward_s = collections.Counter()
        self.requests = collections.Counter()  # encode calls received: "with_items" / "empty"

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model.config.name,
            "dim": int(self.model.out_dim),
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "modalities": list(self.model.modalities),
        }

    def warmup(self) -> float:
        """One forward per tower on a small synthetic batch, before any stream reads; returns
        the seconds it took. The first call of a tower pays one-off costs (the text tokenizer's
        vocabulary, lazy imports, kernel selection, ``torch.compile``) that would otherwise land
        on the first real windows as latency (about 0.3 s on CPU for imagebind_tiny, far more
        with ``compile``). Not counted in :meth:`stats`."""
        import torch

        examples = {
            "vision": np.zeros((2, 224, 224, 3), dtype=np.uint8),
            "audio": np.zeros(32000, dtype=np.float32),
            "imu": np.concatenate([np.linspace(0.0, 5.0, 1000)[:, None], np.zeros((1000, 6))], axis=1),
            "depth": np.ones((224, 224), dtype=np.float32),
            "thermal": np.full((224, 224), 0.5, dtype=np.float32),
            "text": "warm up",
        }
        self._ray_metrics()  # registering them takes a while: not on the first batch
        t0 = time.perf_counter()
        for modality in self.model.modalities:
            if modality in examples:
                self.model.encode(modality, self._prepare(modality, [examples[modality]]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {
            "items": dict(self.items),
            "forward_s": dict(self.forward_s),
            "batch_sizes": {m: list(b) for m, b in self._batcher.batch_sizes.items()},
            "requests": dict(self.requests),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),  # a restarted encoder reports its new process
        }

    # -- stage timing: every row travels with its batch's forward start/end time ------------
    def _forward_timed(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
        """Both stages in this (the forward) thread: ``prepare_ahead`` off."""
        return self._model_timed(modality, *self._prepare_timed(modality, payloads))

    def _ray_metrics(self) -> Any:
        """The encoder's :class:`pipeline.metrics.RayMetrics`, registered on first use."""
        if self._metrics is None:
            from pipeline.metrics import RayMetrics

            self._metrics = RayMetrics()
        return self._metrics

    async def _run_batch(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
        loop = asyncio.get_running_loop()
        self._ray_metrics().batch(modality, len(payloads), self._batcher.depth(modality))
        return await loop.run_in_executor(self._pool, self._forward_timed, modality, payloads)

    async def _prepare_batch(self, modality: str, payloads: list[Any]) -> tuple[Any, int, float]:
        """First stage (``prepare_ahead``): preprocess in the prepare thread; returns the input
        tensor, the item count and the seconds it took."""
        loop = asyncio.get_running_loop()
        self._ray_metrics().batch(modality, len(payloads), self._batcher.depth(modality))
        return await loop.run_in_executor(self._prep_pool, self._prepare_timed, modality, payloads)

    def _prepare(self, modality: str, payloads: list[Any]) -> Any:
        """The model's input for ``payloads``, by its towers' preprocessing contracts."""
        from encoders.preprocess import prepare

        return prepare(modality, payloads, self.device, config=self.model.config, imu_duration=self.imu_span)

    def _prepare_timed(self, modality: str, payloads: list[Any]) -> tuple[Any, int, float]:
        t0 = time.perf_counter()
        x = self._prepare(modality, payloads)
        return x, len(payloads), time.perf_counter() - t0

    async def _run_staged(self, modality: str, staged: tuple[Any, int, float]) -> list[tuple[np.ndarray, float, float]]:
        """Second stage: the model, in the forward thread."""
        x, n, prep_s = staged
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._model_timed, modality, x, n, prep_s)

    def _model_timed(self, modality: str, x: Any, n: int, prep_s: float) -> list[tuple[np.ndarray, float, float]]:
        """Each row with its forward span, which starts the preprocessing's length before the
        model did: with ``prepare_ahead``, the time a prepared batch waited for this thread
        counts as queueing."""
        t0 = time.time()
        rows = self._encode_checked(modality, x)
        t1 = time.time()
        self.items[modality] += n
        self.forward_s[modality] += t1 - t0 + prep_s
        return [(r, t0 - prep_s, t1) for r in rows]

    def _encode_checked(self, modality: str, x: Any) -> list[np.ndarray]:
        emb = self.model.encode(modality, x)
        rows = emb.float().cpu().numpy()
        if not np.all(np.isfinite(rows)):
            bad = int((~np.isfinite(rows).all(axis=1)).sum())
            raise FloatingPointError(f"{modality}: {bad} of {len(rows)} embeddings are not finite")
        return list(rows)

    async def _submit(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
        return await self._batcher.submit_many(modality, payloads)

    def _count_request(self, with_items: bool) -> None:
        # An empty request is a Ray round trip for nothing: the aligners do not send them.
        self.requests["with_items" if with_items else "empty"] += 1

    async def encode(self, modality: str, payloads: list[Any]) -> list[np.ndarray]:
        self._count_request(bool(payloads))
        return [row for row, _, _ in await self._submit(modality, payloads)]

    async def encode_timed(self, modality: str, payloads: list[Any]) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
        """``encode`` plus, per row, the wall-clock start and end of the forward that made it."""
        self._count_request(bool(payloads))
        return _rows_and_spans(await self._submit(modality, payloads))

    async def encode_many(self, groups: dict[str, list[Any]]) -> dict[str, Any]:
        """:meth:`encode_timed` for several towers in one call: an aligner sends everything a
        release of windows needs at once (one Ray call instead of one per modality; each tower
        still batches with every other caller's items). Per modality the ``(rows, spans)`` pair,
        or the error's text where that tower's batch failed; the other towers' rows still come."""
        names = list(groups)
        self._count_request(any(groups.values()))
        outs = await asyncio.gather(*(self._submit(m, groups[m]) for m in names), return_exceptions=True)
        result: dict[str, Any] = {}
        for m, out in zip(names, outs):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out  # cancellation, interpreter exit
                result[m] = f"{type(out).__name__}: {out}"
            else:
                result[m] = _rows_and_spans(out)
        return result


def _rows_and_spans(out: list[tuple[np.ndarray, float, float]]) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """``EncoderActor._submit``'s ``(row, t0, t1)`` triples as rows and forward spans."""
    return [row for row, _, _ in out], [(t0, t1) for _, t0, t1 in out]


class PublisherRestartedError(RuntimeError):
    """A restarted publisher got a call for a session it has not been handed yet: the caller
    must :meth:`PublisherActor.resume` the session (with the seqs to continue from) and retry."""


@ray.remote(num_cpus=0)
class PublisherActor:
    """Owns the ZeroMQ socket. Calls from one aligner run in the order they were made.

    Restartable (``max_restarts``, see run.py): Ray re-runs ``__init__`` with the same options,
    so the socket binds the same concrete endpoint again (the driver resolves a ``*`` port
    once). A restarted publisher knows no session: calls for one raise
    :class:`PublisherRestartedError` until its aligner calls :meth:`resume`. The session-level
    calls return the session's ``next_seq`` table (topic -> next seq) so aligners can resume it.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        from sinks.zmq_publisher import Publisher

        self.pub = Publisher(**options)
        self._known: set[str] = set()  # sessions started or resumed by this incarnation
        with warnings.catch_warnings():  # Ray's own property uses a deprecated one inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._waited = False
        if self._restarted:
            log.warning("publisher restarted (pid %d), bound again to %s; sessions resume on their "
                        "aligner's next call", os.getpid(), self.pub.bound_endpoint)

    def endpoint(self) -> str:
        return self.pub.bound_endpoint

    def pid(self) -> int:
        """The process id (fault tests kill it; Ray restarts it)."""
        return os.getpid()

    def wait_for_subscribers(self) -> None:
        self.pub.wait_for_subscribers()

    def start_session(self, session: str, streams: dict[str, str], model: str, dim: int) -> dict[str, int]:
        self.pub.start_session(session, streams, model, dim)
        self._known.add(session)
        return self.pub.next_seqs(session)

    def resume(self, session: str, streams: dict[str, str], model: str, dim: int,
               next_seq: dict[str, int]) -> dict[str, int]:
        """Take ``session`` over after a restart, continuing ``seq`` at ``next_seq`` (no ``start``
        is re-sent). In replay mode the first resume of an incarnation waits (up to
        ``wait_timeout_s``) for the configured subscribers to reconnect, so what is published
        from here on is not sent into the void."""
        self.pub.resume_session(session, streams, model, dim, next_seq)
        self._known.add(session)
        if self.pub.mode == "replay" and not self._waited:
            self._waited = True
            try:
                self.pub.wait_for_subscribers()
            except TimeoutError as exc:
                log.warning("session '%s': %s; publishing anyway", session, exc)
        log.info("session '%s': resumed on %s at %s", session, self.pub.bound_endpoint, next_seq)
        return self.pub.next_seqs(session)

    def _require(self, session: str) -> None:
        if session not in self._known and self._restarted:
            raise PublisherRestartedError(f"publisher restarted: session '{session}' must be resumed first")

    def publish(self, records: list[Any]) -> dict[str, int]:
        """Publish ``records`` (all of one session); returns that session's ``next_seq`` table."""
        sessions = {r.session for r in records}
        for s in sessions:
            self._require(s)
        self.pub.publish(records)
        return {t: n for s in sessions for t, n in self.pub.next_seqs(s).items()}

    def heartbeat(self, session: str, counters: dict[str, Any]) -> dict[str, int]:
        self._require(session)
        self.pub.heartbeat(session, counters)
        return self.pub.next_seqs(session)

    def end_session(self, session: str, **fields: Any) -> dict[str, int]:
        self._require(session)
        self.pub.end_session(session, **fields)
        return self.pub.next_seqs(session)

    def stats(self) -> dict[str, Any]:
        """:meth:`Publisher.stats` plus this incarnation's ``pid`` and whether it is a ``restarted`` one."""
        return {**self.pub.stats(), "pid": os.getpid(), "restarted": self._restarted}

    def close(self) -> None:
        self.pub.close()


@ray.remote(num_cpus=0)
class AlignerActor:
    """Windows one session, sends released items to the encoders, publishes in window order.

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
    counters (:class:`pipeline.stats.SessionStats`) and instrumentation (``observer``, a
    :class:`pipeline.observe.StageObserver` unless given)."""

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
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self.session = session
        self.streams = streams
        self._readers = ReaderHost(session, list(sources or []), self)  # (StreamSpec, options) each
        if live and live.get("idle_timeout_s"):
            # Live: a silent sensor holds the session's windows back at most this long.
            align = dataclasses.replace(align, idle_after=float(live["idle_timeout_s"]))
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
        self._encoding = EncoderDispatch(len(encoders), retries, self.restart_timeout_s)
        self._publish_order = PublishOrder()
        self._pub_start = dict(publish_start or {})  # model, dim: what a restarted publisher needs
        self._ledger = PublishLedger(self._pub_start.get("seqs"))
        self._ctl_topic = ctl_topic(session)
        self.stats = SessionStats(session)
        self.observer = observer if observer is not None else StageObserver(session)
        # (window, [(item, encode task, row)]) from release to publish, in window order
        self._pending: collections.deque = collections.deque()
        self._pending_changed: asyncio.Event | None = None
        self._pump_task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._done: asyncio.Event | None = None
        self._pub_lock: asyncio.Lock | None = None
        self._finished = False
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

    async def source_stop(self, stream: str) -> None:
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
                         chunks: int | None = 0) -> None:
        """The stream sent ``chunks`` chunks and stops. ``chunks=None``: its source died (the
        driver saw the actor fail) and the count is unknown: the stream ends at once with the
        chunks applied so far; held and later chunks are dropped as ``after_source_failure``."""
        self._ensure_tasks()
        if self._order.ended(stream):
            return  # already ended (e.g. the source ended cleanly, then its process died)
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
                                 missing=self.aligner.missing, encode_retries=self._encoding.retries_done,
                                 publisher_restarts=self._ledger.restarts, stages=self.observer.summary())

    def summary(self) -> dict[str, Any]:
        """:meth:`result` as the run's session summary (``RunResult.sessions``)."""
        return self.result().to_dict()

    def _dropped(self) -> dict[str, int]:
        return merge_dropped(self.aligner.dropped, self.stats.source_dropped, self._order.dropped,
                             self._publish_order.dropped, self._admission.dropped if self._admission else {},
                             self._encoding.dropped())

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
        loop = asyncio.get_running_loop()
        if by_modality:
            fut = loop.create_task(self._encode_group(dict(by_modality)))
        else:  # windows that hold nothing (no caption in them, say): no call to an encoder
            fut = loop.create_future()
            fut.set_result([])
        # Each item's row in the task's result: every modality's rows, in ``by_modality`` order.
        rows = {id(item): row for row, item in enumerate(it for items in by_modality.values() for it in items)}
        t_release = time.time()
        for w in windows:
            self._pending.append((w, [(item, fut, rows[id(item)]) for item in w.items]))
            self.observer.released(w.items, t_release)
        self._pending_changed.set()

    async def _encode_group(self, by_modality: dict[str, list[WindowItem]]) -> list[np.ndarray | None]:
        """The rows of every item of one release, concatenated in ``by_modality`` order: one call
        to the least-loaded encoder carries every modality (:meth:`EncoderActor.encode_many`). A
        modality whose batch failed there, or every modality when the call itself failed (a dead
        or restarting encoder), goes through :meth:`_encode`, which retries it on its own."""
        out, i = await self._encode_many(by_modality)
        parts: list[Any] = []  # per modality its rows, or the task retrying it (all retries run at once)
        for m, items in by_modality.items():
            got = out.get(m)
            if isinstance(got, tuple):
                self.observer.forwarded(items, got[1])
                parts.append(got[0])
                continue
            if got is not None:  # the tower refused the batch: one attempt spent
                log.warning("session '%s': %s batch of %d failed on encoder %d: %s",
                            self.session, m, len(items), i, got)
            parts.append(asyncio.ensure_future(self._encode(m, items, refused_on=i if got is not None else None)))
        rows: list[np.ndarray | None] = []
        for part in parts:
            rows.extend(await part if isinstance(part, asyncio.Future) else part)
        return rows

    async def _encode_many(self, by_modality: dict[str, list[WindowItem]]) -> tuple[dict[str, Any], int | None]:
        """:meth:`EncoderActor.encode_many` on the least-loaded live replica, and which one;
        ``{}`` where the call was lost (or no replica is left)."""
        i = self._encoding.pick()
        if i is None:
            return {}, None
        n = sum(len(items) for items in by_modality.values())
        self._encoding.sent(i, n)
        try:
            return await self.encoders[i].encode_many.remote(
                {m: [it.payload for it in items] for m, items in by_modality.items()}), i
        except Exception as exc:  # lost with the encoder, or refused: every modality on its own
            log.warning("session '%s': encoder %d lost a release of %d items, re-sending per modality: %s",
                        self.session, i, n, str(exc).splitlines()[0])
            return {}, i
        finally:
            self._encoding.returned(i, n)

    async def _encode(self, modality: str, items: list[WindowItem], refused_on: int | None = None) -> list[Any]:
        """Results for ``items``, tried as :class:`pipeline.dispatch.RetryBudget` says; ``None``
        rows (counted as ``<modality>:encoder_error``) once it gives up."""
        from ray.exceptions import ActorDiedError, RayActorError

        payloads = [it.payload for it in items]
        budget = self._encoding.budget(modality, len(items), time.monotonic(), refused_on)
        last_exc: Exception | None = None
        while (step := budget.next()) is not None:
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)
            i = step.replica
            self._encoding.sent(i, len(items))
            try:
                rows, spans = await self.encoders[i].encode_timed.remote(modality, payloads)
                self.observer.forwarded(items, spans)
                return rows
            except RayActorError as exc:  # the actor died, or is restarting
                last_exc = exc
                log.warning("session '%s': encoder %d lost a %s batch of %d (attempt %d), re-sending: %s",
                            self.session, i, modality, len(items), budget.attempts, str(exc).splitlines()[0])
                if isinstance(exc, ActorDiedError) and await self._encoder_dead(i):
                    self._encoding.mark_dead(i)
                    log.error("session '%s': encoder %d is dead (restarts exhausted)", self.session, i)
                budget.lost(i, time.monotonic())
            except Exception as exc:  # the batch failed inside the encoder
                last_exc = exc
                log.warning("session '%s': %s batch of %d failed on encoder %d (attempt %d): %s",
                            self.session, modality, len(items), i, budget.attempts, exc)
                budget.refused(i)
            finally:
                self._encoding.returned(i, len(items))
        log.error("session '%s': dropping %d %s items after %d attempts: %s",
                  self.session, len(items), modality, budget.attempts, last_exc)
        return [None] * len(items)

    async def _encoder_dead(self, i: int) -> bool:
        """True when encoder ``i`` is gone for good; False while it is alive or restarting."""
        from ray.exceptions import ActorDiedError

        try:
            await asyncio.wait_for(self.encoders[i].info.remote(), 60.0)
            return False
        except ActorDiedError:
            return True
        except Exception:
            return False

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
        """Every window whose results are in, in window order: their records, and the items
        behind them. Waits for the first window when none is complete."""
        records: list[Any] = []
        items: list[WindowItem] = []
        while self._pending:
            w, entries = self._pending[0]
            if not all(f.done() for _, f, _ in entries):
                if records:
                    break
                await asyncio.gather(*(f for _, f, _ in entries))
                continue
            self._pending.popleft()
            now = time.time()
            if self._admission is not None:
                self._admission.served(w, now)
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
        if not await self._publisher_call("publish", records, claims=claims):
            return False
        t_pub = time.time()
        self.observer.published(items, t_pub)
        self.stats.record_published(((r.modality, r.t_ingest) for r in records), t_pub)
        return True

    async def _finish(self) -> None:
        # The last gauges and drop counts: a session shorter than heartbeat_s has had no tick yet,
        # and drops since the last one would be lost.
        self._tick()
        if self.stats.publisher_error is None:
            await self._publisher_call(
                "end_session",
                self.session,
                counts=dict(self.stats.counts),
                windows=self.aligner.windows_released,
                dropped=self._dropped(),
                missing=dict(self.aligner.missing),
                errors=dict(self.stats.errors),
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
                await self._publisher_call("heartbeat", self.session, {
                    "windows": self.aligner.windows_released,
                    "counts": dict(self.stats.counts),
                    "dropped": self._dropped(),
                    "pending": len(self._pending),
                    "buffered_samples": self.aligner.buffered_samples(),
                    **self._tick(),
                }, claims={self._ctl_topic: 1})
            except Exception as exc:
                log.warning("session '%s': heartbeat failed: %s", self.session, exc)

    # -- publisher restarts (docs/guarantees.md; the seq rule: pipeline.dispatch.PublishLedger) --
    async def _publisher_call(self, method: str, *args: Any, claims: dict[str, int], **kwargs: Any) -> bool:
        """``publisher.<method>(*args, **kwargs)``, surviving a publisher restart: a call lost
        with the process (``RayActorError``) or refused by the new incarnation
        (:class:`PublisherRestartedError`) is re-sent after :meth:`_resume_publisher`, for up to
        ``restart_timeout_s``. False (and the error recorded as the session's publisher error,
        so the run exits 3) when the publisher is gone for good."""
        from ray.exceptions import ActorDiedError, RayActorError

        if self._pub_lock is None:
            self._pub_lock = asyncio.Lock()
        deadline = time.monotonic() + self.restart_timeout_s
        attempt = 0
        async with self._pub_lock:  # one call at a time: the ledger is exact when resuming
            while True:
                attempt += 1
                self._ledger.claim(claims)
                try:
                    seqs = await getattr(self.publisher, method).remote(*args, **kwargs)
                except (RayActorError, PublisherRestartedError) as exc:
                    if isinstance(exc, PublisherRestartedError):  # refused: consumed no seq
                        self._ledger.refund(claims)
                    log.warning("session '%s': publisher %s failed (attempt %d), resuming and re-sending: %s",
                                self.session, method, attempt, str(exc).splitlines()[0])
                    if (isinstance(exc, ActorDiedError) and await self._publisher_dead()) \
                            or time.monotonic() > deadline or not await self._resume_publisher(deadline):
                        self._publisher_lost(exc)
                        return False
                    continue
                self._ledger.settle(seqs)
                return True

    async def _resume_publisher(self, deadline: float) -> bool:
        """Hand the (restarted) publisher this session and the seqs to continue from."""
        from ray.exceptions import RayActorError

        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            try:
                await self.publisher.resume.remote(
                    self.session, self.streams, self._pub_start.get("model"), int(self._pub_start.get("dim") or 1024),
                    self._ledger.resume_point())
                self._ledger.resumed()
                log.warning("session '%s': publisher resumed at %s", self.session, self._ledger.resume_point())
                return True
            except RayActorError:  # still restarting
                await asyncio.sleep(backoff_s(attempt))
        return False

    async def _publisher_dead(self) -> bool:
        from ray.exceptions import ActorDiedError

        try:
            await asyncio.wait_for(self.publisher.pid.remote(), 60.0)
            return False
        except ActorDiedError:
            return True
        except Exception:
            return False

    def _publisher_lost(self, exc: Exception) -> None:
        error = f"publisher lost: {str(exc).splitlines()[0]}"
        log.error("session '%s': %s", self.session, error)
        self.stats.publisher_lost(error)
