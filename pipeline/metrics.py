"""Per-stage latency bookkeeping and Ray (Prometheus) metrics, shared by every runtime.

Stages of one embedding, all wall-clock ``time.time()`` seconds (one clock per host; across
nodes the split inherits the hosts' clock skew, the total does not exceed it):

=============  ====================================================================
``fill``        oldest sample of the window entered -> newest entered (not in ``total``)
``align_wait``  newest sample of the window entered the pipeline -> window released and sent
                to an encoder (``encoders.coalesce_ms`` of holding included)
``queue``       released -> its batch started (batching wait, queueing, transport; with
                ``encoders.prepare_ahead``, a prepared batch's wait for the model thread too)
``forward``     preprocess + model forward + copy back of the item's batch (their durations)
``publish``     forward done -> published (in-order wait behind earlier windows, send)
``total``       newest sample in -> published: the protocol's ``latency_s``
=============  ====================================================================

``fill`` is the window's own span as the pipeline saw it arrive (2 s of video before its last
frame exists): at replay rate ``r`` about ``span / r`` (less at rate 0, where chunks arrive as
fast as they decode). It happens before the newest sample exists, so it is measured but kept
out of ``total`` and of the latency targets; every runtime pays it equally.

:class:`StageRecorder` keeps the most recent samples (bounded memory) and summarises them;
:class:`RayMetrics` exports the same numbers through ``ray.util.metrics`` (scraped by Ray's
Prometheus endpoint) and is a no-op where Ray metrics are unavailable.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["STAGES", "StageRecorder", "RayMetrics", "percentiles", "source_cpu_split"]

log = logging.getLogger(__name__)

STAGES = ("fill", "align_wait", "queue", "forward", "publish", "total")

# Latency buckets (seconds) for the Prometheus histograms: 1 ms .. 60 s.
_LATENCY_BOUNDS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
_BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def percentiles(values: Iterable[float], qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    """``{"p50": .., "p99": .., "mean": .., "n": ..}``; NaN values are ignored, empty -> NaN."""
    arr = np.asarray([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return {**{f"p{int(q)}": float("nan") for q in qs}, "mean": float("nan"), "n": 0}
    out = {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}
    out["mean"] = float(arr.mean())
    out["n"] = int(arr.size)
    return out


def source_cpu_split(source: Any, thread_s: float) -> dict[str, Any]:
    """CPU seconds of one stream's source by part, for its reader's end stats
    (:class:`pipeline.reader.StreamReader`).

    ``thread_s`` is the ``time.thread_time()`` of the thread that iterated ``source`` (opening
    it, reading, pacing, pushing chunks). A replay source's ``cpu`` meter
    (:class:`sources._common._CpuMeter`) says how much of it went to demux + decode and to
    resizing / pixel-format conversion / resampling, and how much CPU FFmpeg's own decoder and
    scaler threads used besides. Result (seconds)::

        decode_s   in-thread demux + decode, plus the decoder threads' CPU
        resize_s   PyAV reformat / to_ndarray / audio resampling, plus the scaler threads' CPU
        other_s    the rest of the thread: parsing, the guard, pacing, Ray pushes
        total_s    thread_s + the helper threads' CPU = decode_s + resize_s + other_s

    The reader reports ``total_s`` as the stream's ``cpu_s``: its process also reads the
    session's other streams and runs the aligner and Ray's own threads.

    A source without a meter (the live sources; the CSV, JSONL and ``.npy`` readers, which
    neither decode media nor resize) reports all of its thread as ``other_s``, ``measured: False``.
    """
    meter = getattr(source, "cpu", None)
    parts = meter.as_dict() if meter is not None and hasattr(meter, "as_dict") else None
    thread_s = max(0.0, float(thread_s))
    if parts is None:
        return {"decode_s": 0.0, "resize_s": 0.0, "other_s": thread_s, "total_s": thread_s, "measured": False}
    in_thread = float(parts["decode_s"]) + float(parts["resize_s"])
    codec = float(parts.get("codec_threads_s", 0.0))
    scaler = float(parts.get("scaler_threads_s", 0.0))
    return {"decode_s": float(parts["decode_s"]) + codec, "resize_s": float(parts["resize_s"]) + scaler,
            # Both parts are intervals of the same thread's clock inside thread_s; the clamp only
            # absorbs float rounding.
            "other_s": max(0.0, thread_s - in_thread), "total_s": thread_s + codec + scaler, "measured": True}


class StageRecorder:
    """The last ``keep`` samples of every stage (memory does not grow with session length)."""

    def __init__(self, keep: int = 50_000, metrics: "RayMetrics | None" = None, session: str = "") -> None:
        self.samples: dict[str, collections.deque] = {s: collections.deque(maxlen=keep) for s in STAGES}
        self.metrics = metrics
        self.session = session

    def record(self, t_ingest: float, t_release: float, t_fwd0: float, t_fwd1: float, t_pub: float,
               t_first_ingest: float = float("nan")) -> None:
        values = {
            "fill": t_ingest - t_first_ingest,  # NaN when unknown: ignored by the summaries
            "align_wait": t_release - t_ingest,
            "queue": t_fwd0 - t_release,
            "forward": t_fwd1 - t_fwd0,
            "publish": t_pub - t_fwd1,
            "total": t_pub - t_ingest,
        }
        for stage, v in values.items():
            self.samples[stage].append(v)
        if self.metrics is not None:
            self.metrics.stage_latencies(self.session, values)

    def summary(self) -> dict[str, dict[str, float]]:
        return {s: percentiles(self.samples[s]) for s in STAGES}

    def brief(self) -> dict[str, float]:
        """p50/p99 per stage in one flat map, small enough for every heartbeat."""
        out: dict[str, float] = {}
        for s in STAGES:
            p = percentiles(list(self.samples[s])[-2000:])
            if p["n"]:
                out[f"{s}_p50_s"] = round(p["p50"], 4)
                out[f"{s}_p99_s"] = round(p["p99"], 4)
        return out


class RayMetrics:
    """``ray.util.metrics`` instruments of the pipeline, created once per process.

    Names (Prometheus adds Ray's ``ray_`` prefix): ``bindstream_stage_latency_seconds``
    (histogram; tags session, stage), ``bindstream_embeddings_total`` (counter; session,
    modality), ``bindstream_dropped_total`` (counter; session, reason),
    ``bindstream_pending_windows`` (gauge; session), ``bindstream_batch_size`` (histogram;
    modality), ``bindstream_encoder_queue_depth`` (gauge; modality).
    """

    def __init__(self) -> None:
        self._ok = False
        try:
            from ray.util import metrics as m

            self._latency = m.Histogram("bindstream_stage_latency_seconds", "Per-stage latency of embeddings",
                                        boundaries=_LATENCY_BOUNDS, tag_keys=("session", "stage"))
            self._emb = m.Counter("bindstream_embeddings_total", "Embeddings published",
                                  tag_keys=("session", "modality"))
            self._drop = m.Counter("bindstream_dropped_total", "Samples or items dropped, by reason",
                                   tag_keys=("session", "reason"))
            self._pending = m.Gauge("bindstream_pending_windows", "Windows between release and publish",
                                    tag_keys=("session",))
            self._batch = m.Histogram("bindstream_batch_size", "Items per encoder forward",
                                      boundaries=_BATCH_BOUNDS, tag_keys=("modality",))
            self._queue = m.Gauge("bindstream_encoder_queue_depth", "Items waiting for a forward",
                                  tag_keys=("modality",))
            self._ok = True
        except Exception as exc:  # metrics are an aid; never fail the pipeline for them
            log.debug("Ray metrics unavailable: %s", exc)

    def stage_latencies(self, session: str, values: Mapping[str, float]) -> None:
        if not self._ok:
            return
        for stage, v in values.items():
            if v == v:
                self._latency.observe(max(0.0, v), tags={"session": session, "stage": stage})

    def embeddings(self, session: str, counts: Mapping[str, int]) -> None:
        if self._ok:
            for modality, n in counts.items():
                if n:
                    self._emb.inc(n, tags={"session": session, "modality": modality})

    def dropped(self, session: str, reason: str, n: int) -> None:
        if self._ok and n > 0:
            self._drop.inc(n, tags={"session": session, "reason": reason})

    def pending(self, session: str, n: int) -> None:
        if self._ok:
            self._pending.set(n, tags={"session": session})

    def batch(self, modality: str, size: int, queued: int) -> None:
        if self._ok:
            self._batch.observe(size, tags={"modality": modality})
            self._queue.set(queued, tags={"modality": modality})
