"""The Ray actors of the graph: sources, one aligner per session, encoders, the publisher.

The logic lives elsewhere (``sources/`` read, :mod:`pipeline.align` windows,
:mod:`pipeline.batching` batches, ``encoders/`` embed, ``sinks/`` publish); these classes only
move data between them and keep work in flight bounded:

* a source keeps at most ``max_inflight_chunks`` pushes outstanding, so a slow aligner holds
  the reader back (backpressure) instead of queueing decoded frames without limit;
* an aligner keeps at most ``max_inflight_windows`` windows between release and publish, and
  makes ``push`` wait while it is full, which in turn holds its sources back;
* an encoder batches items per tower across every caller (windows and sessions).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from pipeline.align import AlignConfig, Aligner, Window, WindowItem
from pipeline.batching import BatchQueue

__all__ = ["SourceActor", "AlignerActor", "EncoderActor", "PublisherActor"]

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=2)
class SourceActor:
    """Reads one stream and pushes its chunks to the session's aligner, paced by ``rate``."""

    def __init__(self, session: str, spec: Any, aligner: Any, options: dict[str, Any]) -> None:
        self.session = session
        self.spec = spec
        self.aligner = aligner
        self.options = options
        self._stop = False
        self.chunks = 0
        self.samples = 0

    def stop(self) -> None:
        self._stop = True

    def run(self, rate: float, max_inflight: int) -> dict[str, Any]:
        from sources.replay import open_source

        stream = self.spec.id
        error: str | None = None
        inflight: collections.deque = collections.deque()
        source = None
        try:
            source = open_source(self.spec, **self.options)
            t_first: float | None = None
            wall0 = time.time()
            for chunk in source:
                if self._stop:
                    break
                if len(chunk) == 0:
                    continue
                if rate > 0:
                    # Pace on the newest sample of the chunk, relative to the stream's first one.
                    if t_first is None:
                        t_first = float(np.nanmin(chunk.t))
                    due = wall0 + (float(np.nanmax(chunk.t)) - t_first) / rate
                    delay = due - time.time()
                    if delay > 0:
                        time.sleep(delay)
                chunk.t_ingest = time.time()
                while len(inflight) >= max_inflight:
                    ray.get(inflight.popleft())  # raises if the aligner refused the chunk
                inflight.append(self.aligner.push.remote(chunk, self.chunks))
                self.chunks += 1
                self.samples += len(chunk)
            while inflight:
                ray.get(inflight.popleft())
        except Exception as exc:  # reported with the stream id; other streams go on
            error = f"{type(exc).__name__}: {exc}"
            log.error("session '%s' stream '%s' failed: %s", self.session, stream, error)
        dropped = dict(getattr(source, "dropped", {}) or {})
        for ref in inflight:
            try:
                ray.get(ref)
            except Exception:
                pass
        ray.get(self.aligner.end_stream.remote(stream, error, dropped, self.chunks))
        return {"stream": stream, "chunks": self.chunks, "samples": self.samples, "error": error, "dropped": dropped}


@ray.remote(num_cpus=0)
class EncoderActor:
    """Holds one model; batches items per tower across all callers; returns unit-norm rows."""

    def __init__(self, model_options: dict[str, Any], max_batch: int, max_wait_ms: float) -> None:
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
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # One thread runs forwards, so towers never compete for the device or the cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._queues: dict[str, BatchQueue] = {}
        self.items = collections.Counter()
        self.forward_s = collections.Counter()

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model.config.name,
            "dim": int(self.model.out_dim),
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "pid": os.getpid(),
            "modalities": list(self.model.modalities),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "items": dict(self.items),
            "forward_s": dict(self.forward_s),
            "batch_sizes": {m: list(q.batch_sizes) for m, q in self._queues.items()},
        }

    def _forward(self, modality: str, payloads: list[Any]) -> list[np.ndarray]:
        from encoders.preprocess import prepare

        t0 = time.perf_counter()
        x = prepare(modality, payloads, self.device)
        emb = self.model.encode(modality, x)
        rows = emb.float().cpu().numpy()
        if not np.all(np.isfinite(rows)):
            bad = int((~np.isfinite(rows).all(axis=1)).sum())
            raise FloatingPointError(f"{modality}: {bad} of {len(rows)} embeddings are not finite")
        self.items[modality] += len(payloads)
        self.forward_s[modality] += time.perf_counter() - t0
        return list(rows)

    async def _run_batch(self, modality: str, payloads: list[Any]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._forward, modality, payloads)

    async def encode(self, modality: str, payloads: list[Any]) -> list[np.ndarray]:
        q = self._queues.get(modality)
        if q is None:
            q = BatchQueue(
                lambda items, m=modality: self._run_batch(m, items),
                max_batch=self.max_batch,
                max_wait_s=self.max_wait_s,
                name=f"encoder[{modality}]",
            )
            self._queues[modality] = q
        return await q.submit_many(payloads)


@ray.remote(num_cpus=0)
class PublisherActor:
    """Owns the ZeroMQ socket. Calls from one aligner run in the order they were made."""

    def __init__(self, options: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        from sinks.zmq_publisher import Publisher

        self.pub = Publisher(**options)

    def endpoint(self) -> str:
        return self.pub.bound_endpoint

    def wait_for_subscribers(self) -> None:
        self.pub.wait_for_subscribers()

    def start_session(self, session: str, streams: dict[str, str], model: str, dim: int) -> None:
        self.pub.start_session(session, streams, model, dim)

    def publish(self, records: list[Any]) -> None:
        self.pub.publish(records)

    def heartbeat(self, session: str, counters: dict[str, Any]) -> None:
        self.pub.heartbeat(session, counters)

    def end_session(self, session: str, **fields: Any) -> None:
        self.pub.end_session(session, **fields)

    def stats(self) -> dict[str, Any]:
        return self.pub.stats()

    def close(self) -> None:
        self.pub.close()


@ray.remote(num_cpus=0)
class AlignerActor:
    """Windows one session, sends released items to the encoders, publishes in window order."""

    def __init__(
        self,
        session: str,
        streams: dict[str, str],
        align: AlignConfig,
        encoders: list[Any],
        publisher: Any,
        *,
        max_inflight_windows: int = 64,
        heartbeat_s: float = 2.0,
        retries: int = 2,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self.session = session
        self.streams = streams
        self.aligner = Aligner(session, streams, align)
        self.encoders = encoders
        self._load = [0] * len(encoders)  # items in flight per replica, from this session
        self.publisher = publisher
        self.max_inflight = max_inflight_windows
        self.heartbeat_s = heartbeat_s
        self.retries = retries
        self._pending: collections.deque = collections.deque()  # (window, [(item, task, row)])
        self._pending_changed: asyncio.Event | None = None
        self._pump_task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._done: asyncio.Event | None = None
        self._finished = False
        self.counts: collections.Counter[str] = collections.Counter()  # published per modality
        self.encode_errors: collections.Counter[str] = collections.Counter()
        self.source_dropped: collections.Counter[str] = collections.Counter()
        self.source_errors: dict[str, str] = {}
        self.latencies: list[float] = []
        self.t_started = time.time()
        self._held: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        self._next_seq: collections.Counter[str] = collections.Counter()
        self._ends: dict[str, tuple[int, str | None]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if self._pump_task is None:
            self._pending_changed = asyncio.Event()
            self._done = asyncio.Event()
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())
            self._hb_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def push(self, chunk: Any, seq: int) -> None:
        self._ensure_tasks()
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
        while len(self._pending) > self.max_inflight:
            self._pending_changed.clear()
            await self._pending_changed.wait()

    async def end_stream(self, stream: str, error: str | None = None, dropped: dict[str, int] | None = None,
                         chunks: int = 0) -> None:
        self._ensure_tasks()
        if error:
            self.source_errors[stream] = error
        for reason, n in (dropped or {}).items():
            self.source_dropped[f"{stream}:{reason}"] += int(n)
        self._ends[stream] = (chunks, error)
        self._maybe_end(stream)

    def _maybe_end(self, stream: str) -> None:
        end = self._ends.get(stream)
        if end is None or self._next_seq[stream] < end[0]:
            return  # chunks still on their way
        del self._ends[stream]
        self._dispatch(self.aligner.end_stream(stream, end[1]))
        self._pending_changed.set()

    async def wait_done(self) -> dict[str, Any]:
        self._ensure_tasks()
        await self._done.wait()
        return self.summary()

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
            "errors": dict(self.source_errors),
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)),
        }

    def _dropped(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for (stream, reason), n in self.aligner.dropped.items():
            out[f"{stream}:{reason}"] += n
        out.update(self.source_dropped)
        for m, n in self.encode_errors.items():
            out[f"{m}:encoder_error"] += n
        return dict(out)

    # -- encode ----------------------------------------------------------------------------
    def _pick_encoder(self) -> int:
        return min(range(len(self.encoders)), key=lambda i: self._load[i])

    def _dispatch(self, windows: list[Window]) -> None:
        if not windows:
            return
        by_modality: dict[str, list[WindowItem]] = collections.defaultdict(list)
        for w in windows:
            for item in w.items:
                by_modality[item.modality].append(item)
        # item -> (the encode task of its modality, its row in that task's result)
        results: dict[int, tuple[asyncio.Future, int]] = {}
        loop = asyncio.get_running_loop()
        for modality, items in by_modality.items():
            fut = loop.create_task(self._encode(modality, items))
            for row, item in enumerate(items):
                results[id(item)] = (fut, row)
        for w in windows:
            self._pending.append((w, [(item, *results[id(item)]) for item in w.items]))
        self._pending_changed.set()

    async def _encode(self, modality: str, items: list[WindowItem]) -> list[np.ndarray | None]:
        payloads = [it.payload for it in items]
        last_exc: Exception | None = None
        for attempt in range(self.retries + 1):
            i = self._pick_encoder()
            self._load[i] += len(items)
            try:
                return await self.encoders[i].encode.remote(modality, payloads)
            except Exception as exc:  # actor died/restarting, or the batch failed
                last_exc = exc
                log.warning("session '%s': %s batch of %d failed on encoder %d (attempt %d): %s",
                            self.session, modality, len(items), i, attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))
            finally:
                self._load[i] -= len(items)
        log.error("session '%s': dropping %d %s items after %d attempts: %s",
                  self.session, len(items), modality, self.retries + 1, last_exc)
        self.encode_errors[modality] += len(items)
        return [None] * len(items)

    # -- publish ---------------------------------------------------------------------------
    async def _pump(self) -> None:
        from pipeline.protocol import EmbeddingRecord

        while True:
            if not self._pending:
                if self.aligner.done:
                    break
                self._pending_changed.clear()
                await self._pending_changed.wait()
                continue
            # Publish every window whose results are in, in window order, in one call.
            records = []
            while self._pending:
                w, entries = self._pending[0]
                if not all(f.done() for _, f, _ in entries):
                    if records:
                        break
                    await asyncio.gather(*(f for _, f, _ in entries))
                    continue
                self._pending.popleft()
                for item, fut, row in entries:
                    emb = fut.result()[row]
                    if emb is None:
                        continue
                    records.append(EmbeddingRecord(
                        session=self.session, stream=item.stream, modality=item.modality,
                        window=item.window, t_start=item.t_start, t_end=item.t_end,
                        embedding=np.asarray(emb, dtype=np.float32), t_ingest=item.t_ingest,
                    ))
            self._pending_changed.set()
            if records:
                await self.publisher.publish.remote(records)
                now = time.time()
                for r in records:
                    self.counts[r.modality] += 1
                    self.latencies.append(now - r.t_ingest)
                if len(self.latencies) > 100_000:
                    self.latencies = self.latencies[-50_000:]
        await self.publisher.end_session.remote(
            self.session,
            counts=dict(self.counts),
            windows=self.aligner.windows_released,
            dropped=self._dropped(),
            missing=dict(self.aligner.missing),
            errors=dict(self.source_errors),
        )
        self._finished = True
        if self._hb_task:
            self._hb_task.cancel()
        self._done.set()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self._finished:
                return
            try:
                await self.publisher.heartbeat.remote(self.session, {
                    "windows": self.aligner.windows_released,
                    "counts": dict(self.counts),
                    "dropped": self._dropped(),
                    "pending": len(self._pending),
                    "buffered_samples": self.aligner.buffered_samples(),
                })
            except Exception as exc:
                log.warning("session '%s': heartbeat failed: %s", self.session, exc)
