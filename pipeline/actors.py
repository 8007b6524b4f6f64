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
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from pipeline.align import AlignConfig, Aligner, Window, WindowItem
from pipeline.batching import TowerBatcher
from pipeline.reader import ReaderHost

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
    reports each stream, run.py)."""

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
        self._load = [0] * len(encoders)  # items in flight per replica, from this session
        self.publisher = publisher
        self.max_inflight = max_inflight_windows
        # Replay: releases within coalesce_ms of the first go to an encoder in one call.
        self.coalesce_s = max(0.0, float(coalesce_ms)) / 1000.0
        self._coalesced: list[Window] = []
        self.heartbeat_s = heartbeat_s
        self.retries = retries
        self._live_init(live)  # bounded latency for live sessions
        self._pending: collections.deque = collections.deque()  # (window, [(item, task, row)])
        self._pending_changed: asyncio.Event | None = None
        self._pump_task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._done: asyncio.Event | None = None
        self._finished = False
        self.counts: collections.Counter[str] = collections.Counter()  # published per modality
        self.encode_errors: collections.Counter[str] = collections.Counter()
        self.source_dropped: collections.Counter[str] = collections.Counter()
        self.source_errors: dict[str, str] = {}  # stream -> error
        self.publisher_error: str | None = None  # set once the publisher is gone for good
        self.latencies: list[float] = []
        # Stage timing and Ray metrics: item id -> [t_release, t_fwd0, t_fwd1] until published.
        from pipeline.metrics import RayMetrics, StageRecorder, percentiles

        # np.percentile imports numpy.ma on its first call (tenths of a second on a loaded
        # machine): paid here, not by the first heartbeat on the event loop that takes pushes.
        percentiles([0.0])
        self._metrics = RayMetrics()
        self.stages = StageRecorder(keep=20_000, metrics=self._metrics, session=session)
        self._stamps: dict[int, list[float]] = {}
        self._dropped_exported: collections.Counter[str] = collections.Counter()
        self._held: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        self._next_seq: collections.Counter[str] = collections.Counter()
        self._ends: dict[str, tuple[int | None, str | None]] = {}
        # Fault handling: streams whose end was applied, the newest window published
        # per stream (a session may hold two streams of one modality; windows go out in order, so anything at or below it is a duplicate:
        # exactly-once whatever happened upstream), encoders found dead.
        self._ended: set[str] = set()
        self._last_window: dict[str, int] = {}  # stream -> newest window published
        self._dead_encoders: set[int] = set()
        self.encode_retries = 0
        self.restart_timeout_s = 120.0  # how long a batch waits for a restarting encoder (or publisher)
        self._publisher_init(publish_start)  # publisher restarts

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
        if chunk.stream in self._ended:
            # Its source was declared dead (end_stream with chunks=None): too late to apply.
            self.source_dropped[f"{chunk.stream}:after_source_failure"] += len(chunk)
            return self.aligner.origin
        # An async actor may start calls out of submission order; chunks carry a per-stream
        # sequence number and are applied strictly in order.
        held = self._held[chunk.stream]
        held[seq] = chunk
        nxt = self._next_seq[chunk.stream]
        while nxt in held:
            self._dispatch(self.aligner.push(held.pop(nxt)))
            nxt += 1
        self._next_seq[chunk.stream] = nxt
        self._maybe_end(chunk.stream)
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
        if stream in self._ended:
            return  # already ended (e.g. the source ended cleanly, then its process died)
        if error:
            self.source_errors[stream] = error
        for reason, n in (dropped or {}).items():
            self.source_dropped[f"{stream}:{reason}"] += int(n)
        self._ends[stream] = (chunks, error)
        self._maybe_end(stream)

    def _maybe_end(self, stream: str) -> None:
        end = self._ends.get(stream)
        if end is None or (end[0] is not None and self._next_seq[stream] < end[0]):
            return  # chunks still on their way
        del self._ends[stream]
        self._ended.add(stream)
        held = self._held.pop(stream, {})
        if held:
            self.source_dropped[f"{stream}:after_source_failure"] += sum(len(c) for c in held.values())
        self._dispatch(self.aligner.end_stream(stream, end[1]))
        self._pending_changed.set()

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
            "published": sum(self.counts.values()),
            "pending": len(self._pending),
            "done": self._finished,
        }

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {
            "session": self.session,
            "windows": self.aligner.windows_released,
            "counts": dict(self.counts),
            "dropped": self._dropped(),
            "missing": dict(self.aligner.missing),
            "errors": self._errors(),
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)),
            "encode_retries": self.encode_retries,
            "publisher_restarts": self.publisher_restarts,
            "stages": self.stages.summary(),
        }

    def _errors(self) -> dict[str, str]:
        """The summary's ``errors``: per stream, and ``publisher`` once the publisher is lost."""
        out = dict(self.source_errors)
        if self.publisher_error is not None:
            out["publisher"] = self.publisher_error
        return out

    def _dropped(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for (stream, reason), n in self.aligner.dropped.items():
            out[f"{stream}:{reason}"] += n
        out.update(self.source_dropped)
        out.update(self._shed)
        for m, n in self.encode_errors.items():
            out[f"{m}:encoder_error"] += n
        return dict(out)

    # -- encode ----------------------------------------------------------------------------
    def _dispatch(self, windows: list[Window]) -> None:
        if self._live is not None and not self._feeding:
            self._backlog.extend(windows)  # live: admitted by _live_feed, which may shed
            self._live_feed()
            return
        if not windows:
            return
        if self.coalesce_s > 0 and self._live is None:
            # Streams that complete a window together (audio and IMU at its end, say) arrive as
            # separate pushes a few ms apart: held this long, their parts share one encoder call
            # (a Ray round trip each, in the window-end burst where every core is busy).
            if not self._coalesced:
                asyncio.get_running_loop().call_later(self.coalesce_s, self._flush_coalesced)
            self._coalesced.extend(windows)
            return
        self._send(windows)

    def _flush_coalesced(self) -> None:
        windows, self._coalesced = self._coalesced, []
        self._send(windows)

    def _send(self, windows: list[Window]) -> None:
        """One encoder call for every item of ``windows``; each window queued for publishing."""
        by_modality: dict[str, list[WindowItem]] = collections.defaultdict(list)
        for w in windows:
            for item in w.items:
                by_modality[item.modality].append(item)
        # item -> (the encode task of the release, its row in that task's result: the rows of
        # every modality, concatenated in ``by_modality`` order)
        results: dict[int, tuple[asyncio.Future, int]] = {}
        if by_modality:
            fut = asyncio.get_running_loop().create_task(self._encode_group(dict(by_modality)))
        else:  # windows that hold nothing (no caption in them, say): no call to an encoder
            fut = asyncio.get_running_loop().create_future()
            fut.set_result([])
        row = 0
        for items in by_modality.values():
            for item in items:
                results[id(item)] = (fut, row)
                row += 1
        t_release = time.time()
        for w in windows:
            self._pending.append((w, [(item, *results[id(item)]) for item in w.items]))
            for item in w.items:
                self._stamps[id(item)] = [t_release, math.nan, math.nan]
        self._pending_changed.set()

    async def _encode_group(self, by_modality: dict[str, list[WindowItem]]) -> list[np.ndarray | None]:
        """The rows of every item of one release, concatenated in ``by_modality`` order: one call
        to the least-loaded encoder carries every modality (:meth:`EncoderActor.encode_many`). A
        modality whose batch failed there, or every modality when the call itself failed (a dead
        or restarting encoder), goes through :meth:`_encode`, which retries it on its own."""
        live = [i for i in range(len(self.encoders)) if i not in self._dead_encoders]
        out: dict[str, Any] = {}
        if live:
            i = min(live, key=lambda j: self._load[j])
            n = sum(len(items) for items in by_modality.values())
            self._load[i] += n
            try:
                out = await self.encoders[i].encode_many.remote(
                    {m: [it.payload for it in items] for m, items in by_modality.items()})
            except Exception as exc:  # lost with the encoder, or refused: every modality on its own
                log.warning("session '%s': encoder %d lost a release of %d items, re-sending per modality: %s",
                            self.session, i, n, str(exc).splitlines()[0])
                out = {}
            finally:
                self._load[i] -= n
        # Per modality its rows, or the task retrying it (all retries run at once).
        parts: list[Any] = []
        for m, items in by_modality.items():
            got = out.get(m)
            if isinstance(got, tuple):
                self._note_forward(items, got[1])
                parts.append(got[0])
                continue
            failed, last = 0, None
            if got is not None:  # the tower refused the batch: one attempt spent
                log.warning("session '%s': %s batch of %d failed on encoder %d: %s",
                            self.session, m, len(items), i, got)
                self.encode_retries += int(self.retries > 0)
                failed, last = 1, RuntimeError(got)
            parts.append(asyncio.ensure_future(self._encode(m, items, failed=failed, last_exc=last)))
        rows: list[np.ndarray | None] = []
        for part in parts:
            rows.extend(await part if isinstance(part, asyncio.Future) else part)
        return rows

    async def _encode(self, modality: str, items: list[WindowItem], failed: int = 0,
                      last_exc: Exception | None = None) -> list[np.ndarray | None]:
        """Results for ``items``, retried until they come back. A dead or restarting encoder
        (Ray restarts it, ``max_restarts``) is not the batch's fault: the batch is re-sent, to
        another replica where there is one, for up to ``restart_timeout_s``. A batch the encoder
        itself refuses (an exception inside ``encode``) is retried ``retries`` times (``failed``:
        the attempts it already had, in :meth:`_encode_group`). Encoders are
        pure functions of their input, so a batch run twice gives the same rows, and each
        window's result is used once: delivery stays exactly-once."""
        from ray.exceptions import ActorDiedError, RayActorError

        payloads = [it.payload for it in items]
        failures = failed
        attempt = failed
        deadline = time.monotonic() + self.restart_timeout_s
        if 0 < failures <= self.retries:
            await asyncio.sleep(0.5 * failures)
        while failures <= self.retries:
            live = [i for i in range(len(self.encoders)) if i not in self._dead_encoders]
            if not live:
                break
            i = min(live, key=lambda j: self._load[j])
            attempt += 1
            self._load[i] += len(items)
            try:
                rows, spans = await self.encoders[i].encode_timed.remote(modality, payloads)
                self._note_forward(items, spans)
                return rows
            except RayActorError as exc:  # the actor died, or is restarting
                last_exc = exc
                self.encode_retries += 1
                log.warning("session '%s': encoder %d lost a %s batch of %d (attempt %d), re-sending: %s",
                            self.session, i, modality, len(items), attempt, str(exc).splitlines()[0])
                if isinstance(exc, ActorDiedError) and await self._encoder_dead(i):
                    self._dead_encoders.add(i)
                    log.error("session '%s': encoder %d is dead (restarts exhausted)", self.session, i)
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(min(2.0, 0.2 * attempt))
            except Exception as exc:  # the batch failed inside the encoder
                last_exc = exc
                failures += 1
                log.warning("session '%s': %s batch of %d failed on encoder %d (attempt %d): %s",
                            self.session, modality, len(items), i, attempt, exc)
                if failures > self.retries:
                    break
                self.encode_retries += 1
                await asyncio.sleep(0.5 * failures)
            finally:
                self._load[i] -= len(items)
        log.error("session '%s': dropping %d %s items after %d attempts: %s",
                  self.session, len(items), modality, attempt, last_exc)
        self.encode_errors[modality] += len(items)
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
        from sinks.protocol import EmbeddingRecord

        while True:
            if self._live is not None:
                self._live_feed()
            if not self._pending:
                if self.aligner.done and not self._coalesced:
                    break
                self._pending_changed.clear()
                await self._pending_changed.wait()
                continue
            # Publish every window whose results are in, in window order, in one call.
            records = []
            stamped: list[WindowItem] = []  # the items behind ``records``, for stage timing
            while self._pending:
                w, entries = self._pending[0]
                if not all(f.done() for _, f, _ in entries):
                    if records:
                        break
                    await asyncio.gather(*(f for _, f, _ in entries))
                    continue
                self._pending.popleft()
                if self._live is not None:
                    self._live_served(w)
                for item, fut, row in entries:
                    emb = fut.result()[row]
                    if emb is None:
                        continue
                    if self._live is not None and self._live_late(item):
                        continue  # would break the latency bound: counted, not published
                    if item.window <= self._last_window.get(item.stream, -1):
                        self.source_dropped[f"{item.stream}:duplicate_window"] += 1
                        continue  # never twice
                    self._last_window[item.stream] = item.window
                    stamped.append(item)
                    records.append(EmbeddingRecord(
                        session=self.session, stream=item.stream, modality=item.modality,
                        window=item.window, t_start=item.t_start, t_end=item.t_end,
                        embedding=np.asarray(emb, dtype=np.float32), t_ingest=item.t_ingest,
                    ))
            self._pending_changed.set()
            if records:
                if not await self._publisher_call("publish", records, claims=self._claims(records)):
                    break  # the publisher is gone for good: the session ends with the error
                self._note_published(stamped, time.time())
                now = time.time()
                for r in records:
                    self.counts[r.modality] += 1
                    self.latencies.append(now - r.t_ingest)
                if len(self.latencies) > 100_000:
                    self.latencies = self.latencies[-50_000:]
        # The last gauges and drop counts: a session shorter than heartbeat_s has had no tick yet,
        # and drops since the last one would be lost.
        self._metrics_tick()
        if self.publisher_error is None:
            await self._publisher_call(
                "end_session",
                self.session,
                counts=dict(self.counts),
                windows=self.aligner.windows_released,
                dropped=self._dropped(),
                missing=dict(self.aligner.missing),
                errors=dict(self.source_errors),
                claims={self._ctl_topic: 1},
            )
        self._finished = True
        self._pending_changed.set()  # releases pushes held by backpressure (publisher lost)
        if self._hb_task:
            self._hb_task.cancel()
        self._done.set()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self._finished:
                return
            if self.publisher_error is not None:
                return
            try:
                await self._publisher_call("heartbeat", self.session, {
                    "windows": self.aligner.windows_released,
                    "counts": dict(self.counts),
                    "dropped": self._dropped(),
                    "pending": len(self._pending),
                    "buffered_samples": self.aligner.buffered_samples(),
                    **self._metrics_tick(),
                }, claims={self._ctl_topic: 1})
            except Exception as exc:
                log.warning("session '%s': heartbeat failed: %s", self.session, exc)

    # -- publisher restarts (docs/guarantees.md) ------------------------------------------------
    # Every topic of this session (ctl/<session>, emb/<session>/<modality>) is written by this
    # aligner alone (plus the driver's ``start``, whose seqs come in ``publish_start``). Before
    # each call the aligner adds the seqs the call will consume (one per record of a topic, one
    # per control message) to ``_pub_seq``; so ``_pub_seq`` is always at or past what the
    # publisher used, even for a call that died half-way. A restarted publisher is resumed at
    # ``_pub_seq``: seqs never repeat; the ones a dead call burned show up as a gap.
    def _publisher_init(self, start: dict[str, Any] | None) -> None:
        from sinks.protocol import ctl_topic

        start = dict(start or {})
        self._pub_start = start  # model, dim: what a restarted publisher needs to accept records
        self._pub_seq: dict[str, int] = {str(k): int(v) for k, v in (start.get("seqs") or {}).items()}
        self._ctl_topic = ctl_topic(self.session)
        self._pub_lock: asyncio.Lock | None = None
        self.publisher_restarts = 0

    def _claims(self, records: list[Any]) -> dict[str, int]:
        from sinks.protocol import emb_topic

        return dict(collections.Counter(emb_topic(r.session, r.modality) for r in records))

    async def _publisher_call(self, method: str, *args: Any, claims: dict[str, int], **kwargs: Any) -> bool:
        """``publisher.<method>(*args, **kwargs)``, surviving a publisher restart: a call lost
        with the process (``RayActorError``) or refused by the new incarnation
        (:class:`PublisherRestartedError`) is re-sent after :meth:`_resume_publisher`, for up to
        ``restart_timeout_s``. False (and the error recorded as :attr:`publisher_error`, reported as
        ``errors["publisher"]`` in the summary, so the run exits 3) when the publisher is gone for good."""
        from ray.exceptions import ActorDiedError, RayActorError

        if self._pub_lock is None:
            self._pub_lock = asyncio.Lock()
        deadline = time.monotonic() + self.restart_timeout_s
        attempt = 0
        async with self._pub_lock:  # one call at a time: _pub_seq is exact when resuming
            while True:
                attempt += 1
                for topic, n in claims.items():
                    self._pub_seq[topic] = self._pub_seq.get(topic, 0) + n
                try:
                    seqs = await getattr(self.publisher, method).remote(*args, **kwargs)
                except (RayActorError, PublisherRestartedError) as exc:
                    if isinstance(exc, PublisherRestartedError):  # refused: consumed no seq
                        for topic, n in claims.items():
                            self._pub_seq[topic] -= n
                    log.warning("session '%s': publisher %s failed (attempt %d), resuming and re-sending: %s",
                                self.session, method, attempt, str(exc).splitlines()[0])
                    if (isinstance(exc, ActorDiedError) and await self._publisher_dead()) \
                            or time.monotonic() > deadline or not await self._resume_publisher(deadline):
                        self._publisher_lost(exc)
                        return False
                    continue
                for topic, n in (seqs or {}).items():
                    self._pub_seq[topic] = max(self._pub_seq.get(topic, 0), int(n))
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
                    dict(self._pub_seq))
                self.publisher_restarts += 1
                log.warning("session '%s': publisher resumed at %s", self.session, self._pub_seq)
                return True
            except RayActorError:  # still restarting
                await asyncio.sleep(min(2.0, 0.2 * attempt))
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
        self.publisher_error = error

    # -- stage timing and metrics ---------------------------------------------------------------
    def _note_forward(self, items: list[WindowItem], spans: list[tuple[float, float]]) -> None:
        for item, (t0, t1) in zip(items, spans):
            st = self._stamps.get(id(item))
            if st is not None:
                st[1], st[2] = t0, t1

    def _note_published(self, items: list[WindowItem], t_pub: float) -> None:
        by_modality: collections.Counter[str] = collections.Counter()
        for item in items:
            st = self._stamps.pop(id(item), None)
            by_modality[item.modality] += 1
            if st is not None:
                self.stages.record(item.t_ingest, st[0], st[1], st[2], t_pub, t_first_ingest=item.t_first_ingest)
        self._metrics.embeddings(self.session, by_modality)
        # Items never published (encoder errors, duplicates) leave with their window.
        if len(self._stamps) > 4 * (self.max_inflight + 1) * max(1, len(self.streams)):
            live = {id(it) for _, entries in self._pending for it, _, _ in entries}
            self._stamps = {k: v for k, v in self._stamps.items() if k in live}

    def _metrics_tick(self) -> dict[str, Any]:
        """Export gauges and drop deltas; return the heartbeat's stage summary."""
        self._metrics.pending(self.session, len(self._pending))
        for reason, n in self._dropped().items():
            delta = n - self._dropped_exported[reason]
            if delta > 0:
                self._metrics.dropped(self.session, reason, delta)
                self._dropped_exported[reason] = n
        return {"latency": self.stages.brief()}

    # -- live: bounded publish latency (docs/live.md) -------------------------------------------
    # Released windows wait in a backlog; at most ``inflight`` of them are with the encoders.
    # Before admitting one, windows that can no longer be published within max_latency_s (their
    # age plus the recent dispatch-to-publish time) are shed, oldest first, counted per stream as
    # ``shed_latency``; with ``shed: subsample`` the ``subsample`` modalities of every other
    # window are dropped first once half the bound is used (``subsampled``). A result older
    # than 90 % of the bound when its turn to publish comes is dropped as ``late_publish``.
    def _live_init(self, live: dict[str, Any] | None) -> None:
        self._live = live
        self._feeding = False
        self._backlog: collections.deque = collections.deque()
        self._shed: collections.Counter[str] = collections.Counter()
        self._served_s = 0.0  # EWMA of dispatch -> publish time of one window
        self._dispatched_at: dict[int, float] = {}

    @staticmethod
    def _age(w: Window, now: float) -> float:
        return now - max((it.t_ingest for it in w.items), default=now)

    def _live_feed(self) -> None:
        live = self._live
        assert live is not None
        bound = float(live.get("max_latency_s") or 0.0)
        cap = max(1, int(live.get("inflight", 2)))
        now = time.time()
        subsample = set(live.get("subsample") or ()) if live.get("shed") == "subsample" else set()
        admit: list[Window] = []
        # The cap counts windows: with ``release: stream`` a window comes in several parts.
        busy = {w.index for w, _ in self._pending}
        while self._backlog and (len(busy) < cap or self._backlog[0].index in busy):
            w = self._backlog.popleft()
            if bound > 0:
                expected = self._age(w, now) + self._served_s
                if expected > bound:
                    for it in w.items:
                        self._shed[f"{it.stream}:shed_latency"] += 1
                    if not self._pending and not admit and self._age(w, now) <= bound:
                        # Nothing in flight can refresh an estimate taken during a stall (a
                        # publisher restart): let it decay, or every window is shed from now on.
                        self._served_s *= 0.5
                    continue
                if subsample and expected > bound / 2:
                    if w.index % 2:  # every other window, by index: the same for all its parts
                        keep = [it for it in w.items if it.modality not in subsample]
                        for it in w.items:
                            if it.modality in subsample:
                                self._shed[f"{it.stream}:subsampled"] += 1
                        w.items = keep
            admit.append(w)
            busy.add(w.index)
        for w in admit:
            self._dispatched_at[id(w)] = now
        if admit:
            self._feeding = True
            try:
                self._dispatch(admit)
            finally:
                self._feeding = False

    def _live_served(self, w: Window) -> None:
        t0 = self._dispatched_at.pop(id(w), None)
        if t0 is not None:
            self._served_s = 0.7 * self._served_s + 0.3 * (time.time() - t0)

    def _live_late(self, item: WindowItem) -> bool:
        bound = float(self._live.get("max_latency_s") or 0.0) if self._live else 0.0
        # 10 % of the bound is left for the publish call and the socket.
        if bound > 0 and time.time() - item.t_ingest > 0.9 * bound:
            self._shed[f"{item.stream}:late_publish"] += 1
            return True
        return False
