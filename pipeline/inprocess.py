"""The whole pipeline in one process, without Ray: decode -> align -> preprocess -> encode -> publish.

The same parts as the Ray graph (``sources.replay.open_source`` with its frame selection, the
:class:`sources.guard.StreamGuard` of every stream, :class:`pipeline.align.Aligner`,
:func:`encoders.preprocess.prepare`, ``model.encode``, any :class:`sinks.base.SinkBase` such as
the ZeroMQ :class:`sinks.zmq_publisher.Publisher`) driven by one loop. It is what the Ray graph
must beat (``bench/pipeline.py`` measures both on the same work), and a library entry point for
notebooks and small jobs that want embeddings without starting Ray::

    from pipeline.inprocess import run_inprocess
    from sinks.memory import ListSink
    sink = ListSink(model_name="imagebind_tiny")
    result = run_inprocess([load_session(path)], model, sink, align=AlignConfig())

The loop reads one chunk from every stream in turn (as concurrent stream readers would deliver
them), releases windows, encodes released items per modality in batches of ``max_batch``
once ``max_batch`` windows are waiting or the oldest waited ``max_wait_s`` (the encoders' rule),
and publishes them in window order. At ``rate > 0`` each chunk is read when it is known
complete (``Chunk.known_at``) on the session clock; unlike the stream readers there are no
watermark-only chunks between a sparse stream's samples. Memory is bounded: at most
``max_batch`` windows (plus one round) are held.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.align import AlignConfig, Aligner, Window, WindowItem
from pipeline.config import EncodersConfig, ReplayConfig, SourcesConfig
from pipeline.metrics import StageRecorder
from pipeline.stats import SessionResult, SessionStats, merge_dropped
from sinks.protocol import EmbeddingRecord
from sources.session import SessionSpec

__all__ = ["InProcessResult", "run_inprocess", "session_windows"]

log = logging.getLogger(__name__)


def session_windows(spec: SessionSpec, align: AlignConfig | None = None, *, select_frames: bool = False,
                    max_gap_s: float = SourcesConfig.max_gap_s, **source_options: Any) -> list[Window]:
    """Every window of a recorded session, aligned in this process: the reference for what the
    graph publishes (tests, benchmarks). Streams are read round-robin, one chunk at a time, as
    concurrent stream readers would deliver them; the windows do not depend on that order.
    Every frame is read unless ``select_frames`` (the graph's default, which must give the same
    windows: docs/alignment.md). ``max_gap_s``: the clock-jump guard, as ``sources.max_gap_s``."""
    from sources.guard import StreamGuard
    from sources.replay import open_source

    align = align or AlignConfig()
    # Whole windows, whatever the run releases: the parts of ``release: stream`` hold the same items.
    al = Aligner(spec.name, {s.id: s.modality for s in spec.streams}, dataclasses.replace(align, release="window"))
    selectors = _selectors(spec, align) if select_frames else {}
    readers = {s.id: iter(open_source(s, select=selectors.get(s.id), **source_options)) for s in spec.streams}
    guards = {s.id: StreamGuard(spec.name, s.id, s.modality, max_gap_s=max_gap_s) for s in spec.streams}
    windows: list[Window] = []
    while readers:
        for sid in list(readers):
            chunk = next(readers[sid], None)
            if chunk is None:
                del readers[sid]
                windows += al.end_stream(sid)
            else:
                windows += al.push(guards[sid].apply(chunk))
                _tell_origin(selectors, al)
    return windows


def _selectors(spec: SessionSpec, align: AlignConfig) -> dict[str, Any]:
    from pipeline.selection import frame_selector

    out = {s.id: frame_selector(s.modality, align) for s in spec.streams}
    return {k: v for k, v in out.items() if v is not None}


def _tell_origin(selectors: dict[str, Any], al: Aligner) -> None:
    """Selectors learn the window origin once the session's aligner has fixed it."""
    if al.origin is not None:
        for sel in selectors.values():
            if sel.origin is None:
                sel.origin = al.origin


@dataclass
class InProcessResult:
    sessions: list[dict[str, Any]]  # per session: SessionResult.to_dict()
    elapsed_s: float
    stages: dict[str, dict[str, float]]  # StageRecorder.summary(), every session
    latencies: list[float]  # total latency per embedding, every session (bounded to the last 100k)
    items: dict[str, int] = field(default_factory=dict)  # encoded per modality
    forward_s: dict[str, float] = field(default_factory=dict)  # preprocess + forward per modality
    batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    source_cpu_s: dict[str, float] = field(default_factory=dict)  # "session/stream" -> decode CPU s

    @property
    def windows(self) -> int:
        return sum(s["windows"] for s in self.sessions)


class _Stream:
    def __init__(self, session: str, spec: Any, source: Any, guard: Any) -> None:
        self.session = session
        self.spec = spec
        self.it = iter(source)
        self.source = source
        self.guard = guard
        self.t_first: float | None = None
        self.cpu_s = 0.0
        self.error: str | None = None


class _Session:
    """One session's aligner, frame selectors, counters and stage samples."""

    def __init__(self, spec: SessionSpec, align: AlignConfig, clock: Callable[[], float], select_frames: bool) -> None:
        self.name = spec.name
        self.streams = {s.id: s.modality for s in spec.streams}
        self.aligner = Aligner(spec.name, self.streams, align, clock=clock)
        self.selectors = _selectors(spec, align) if select_frames else {}
        self.stats = SessionStats(spec.name)
        self.stages = StageRecorder()

    def result(self) -> SessionResult:
        return self.stats.result(windows=self.aligner.windows_released,
                                 dropped=merge_dropped(self.aligner.dropped, self.stats.source_dropped),
                                 missing=self.aligner.missing, stages=self.stages.summary())


class _Encoder:
    """``model`` in batches of at most ``max_batch`` per modality, with the encoders' counters."""

    def __init__(self, model: Any, device: Any, max_batch: int, clock: Callable[[], float],
                 imu_span: float | None = None) -> None:
        self.model, self.device, self.max_batch, self.clock = model, device, max_batch, clock
        self.imu_span = imu_span  # what an IMU window covers: the encoder resamples over it
        self.items: collections.Counter[str] = collections.Counter()
        self.forward_s: collections.Counter[str] = collections.Counter()
        self.batch_sizes: dict[str, list[int]] = collections.defaultdict(list)

    def encode(self, items: list[WindowItem]) -> dict[int, tuple[np.ndarray, float, float]]:
        """id(item) -> (row, forward start, forward end)."""
        from encoders.preprocess import prepare

        by_mod: dict[str, list[WindowItem]] = collections.defaultdict(list)
        for it in items:
            by_mod[it.modality].append(it)
        out: dict[int, tuple[np.ndarray, float, float]] = {}
        for modality, its in by_mod.items():
            for lo in range(0, len(its), self.max_batch):
                part = its[lo:lo + self.max_batch]
                t0 = self.clock()
                x = prepare(modality, [it.payload for it in part], self.device, config=self.model.config,
                            imu_duration=self.imu_span)
                rows = self.model.encode(modality, x).float().cpu().numpy()
                t1 = self.clock()
                self.items[modality] += len(part)
                self.forward_s[modality] += t1 - t0
                self.batch_sizes[modality].append(len(part))
                for it, row in zip(part, rows):
                    out[id(it)] = (row, t0, t1)
        return out


class _Loop:
    """Reads every stream round-robin, releases windows, encodes and publishes them in order."""

    def __init__(self, sessions: dict[str, _Session], encoder: _Encoder, sink: Any, clock: Callable[[], float], *,
                 rate: float, max_batch: int, max_wait_s: float) -> None:
        self.sessions, self.encoder, self.sink, self.clock = sessions, encoder, sink, clock
        self.rate, self.max_batch, self.max_wait_s = rate, max_batch, max_wait_s
        self.released: list[tuple[Window, float]] = []  # (window, t_release)
        self.stages = StageRecorder()
        self.latencies: collections.deque[float] = collections.deque(maxlen=100_000)
        self.wall0 = clock()

    def run(self, streams: list[_Stream]) -> None:
        live = list(streams)
        while live:
            for st in list(live):
                if not self.step(st):
                    live.remove(st)
            # The encoders' batching rule: a full batch, or the oldest released window waited long enough.
            if len(self.released) >= self.max_batch or (
                    self.released and self.clock() - self.released[0][1] >= self.max_wait_s):
                self.encode_and_publish()
        self.encode_and_publish()

    def step(self, st: _Stream) -> bool:
        """One chunk of ``st`` into its aligner; False once the stream has ended."""
        chunk = self._next_chunk(st)
        sess = self.sessions[st.session]
        if chunk is None:
            sess.stats.stream_ended(st.spec.id, st.error,
                                    st.guard.merge_into(getattr(st.source, "dropped", {}) or {}))
            self._release(sess.aligner.end_stream(st.spec.id, st.error))
            return False
        chunk = st.guard.apply(chunk)  # clock jumps, non-finite data: dropped and counted
        if len(chunk) == 0:
            return True
        if self.rate > 0:
            if st.t_first is None:
                st.t_first = float(np.nanmin(chunk.t))
            delay = self.wall0 + (chunk.known_at() - st.t_first) / self.rate - self.clock()
            if delay > 0:
                time.sleep(delay)
        chunk.t_ingest = self.clock()
        windows = sess.aligner.push(chunk)
        _tell_origin(sess.selectors, sess.aligner)
        self._release(windows)
        return True

    @staticmethod
    def _next_chunk(st: _Stream) -> Any:
        # Process CPU, not thread CPU: PyAV decodes in its own threads, and nothing else runs
        # while this loop waits for a chunk.
        t0 = time.process_time()
        try:
            chunk = next(st.it, None)
        except Exception as exc:  # one broken stream must not stop the others
            chunk = None
            st.error = f"{type(exc).__name__}: {exc}"
            log.error("session '%s' stream '%s' failed: %s", st.session, st.spec.id, st.error)
        st.cpu_s += time.process_time() - t0
        return chunk

    def _release(self, windows: list[Window]) -> None:
        t_rel = self.clock()
        self.released.extend((w, t_rel) for w in windows)

    def encode_and_publish(self) -> None:
        if not self.released:
            return
        rows = self.encoder.encode([it for w, _ in self.released for it in w.items])
        # Windows are released in order per session, so publishing them as released keeps order.
        for w, t_rel in self.released:
            records = [EmbeddingRecord(session=it.session, stream=it.stream, modality=it.modality, window=it.window,
                                       t_start=it.t_start, t_end=it.t_end,
                                       embedding=rows[id(it)][0].astype(np.float32), t_ingest=it.t_ingest)
                       for it in w.items]
            if records:
                self.sink.publish(records)
            t_pub = self.clock()
            sess = self.sessions[w.session]
            sess.stats.record_published(((it.modality, it.t_ingest) for it in w.items), t_pub)
            for it in w.items:
                _, t0, t1 = rows[id(it)]
                for rec in (self.stages, sess.stages):
                    rec.record(it.t_ingest, t_rel, t0, t1, t_pub, t_first_ingest=it.t_first_ingest)
                self.latencies.append(t_pub - it.t_ingest)
        self.released.clear()

    def finish(self) -> list[SessionResult]:
        """Each session's ``end`` sent to the sink; their results."""
        results = []
        for sess in self.sessions.values():
            res = sess.result()
            self.sink.end_session(sess.name, counts=res.counts, windows=res.windows, dropped=res.dropped,
                                  missing=res.missing, errors=res.errors)
            results.append(res)
        return results


def _open_streams(spec: SessionSpec, sess: _Session, *, chunk_seconds: float, video_size: int, max_pixels: int,
                  max_gap_s: float) -> list[_Stream]:
    from sources.guard import StreamGuard
    from sources.replay import open_source

    out = []
    for s in spec.streams:
        src = open_source(s, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels,
                          select=sess.selectors.get(s.id))
        out.append(_Stream(spec.name, s, src, StreamGuard(spec.name, s.id, s.modality, max_gap_s=max_gap_s)))
    return out


def run_inprocess(
    specs: Sequence[SessionSpec],
    model: Any,
    sink: Any,
    *,
    align: AlignConfig | None = None,
    chunk_seconds: float = ReplayConfig.chunk_seconds,
    video_size: int = SourcesConfig.video_size,
    max_pixels: int = SourcesConfig.max_pixels,
    max_batch: int = EncodersConfig.max_batch,
    max_wait_s: float = 0.02,
    rate: float = 0.0,
    device: Any = None,
    clock: Callable[[], float] = time.time,
    select_frames: bool = SourcesConfig.select_frames,
    max_gap_s: float = SourcesConfig.max_gap_s,
) -> InProcessResult:
    """Replay ``specs`` through ``model`` into ``sink`` (already bound/constructed; not closed here).

    A stream that fails is ended with its error and the others go on, as in the Ray graph.
    ``select_frames``: only frames some window can pick are scaled / decoded, as the graph's
    ``sources.select_frames`` (docs/alignment.md). ``max_gap_s``: the clock-jump and
    non-finite-data guard of every stream, as the graph's ``sources.max_gap_s``
    (sources/guard.py; its drops are counted with the source's). Each session's summary
    (:class:`pipeline.stats.SessionResult`) holds its own counts and latencies.
    """
    import torch

    align = align or AlignConfig()
    dev = torch.device(device) if device is not None else model.device
    sessions: dict[str, _Session] = {}
    streams: list[_Stream] = []
    for spec in specs:
        sess = sessions[spec.name] = _Session(spec, align, clock, select_frames)
        sink.start_session(spec.name, sess.streams, model.config.name, int(model.out_dim))
        streams += _open_streams(spec, sess, chunk_seconds=chunk_seconds, video_size=video_size,
                                 max_pixels=max_pixels, max_gap_s=max_gap_s)
    encoder = _Encoder(model, dev, max_batch, clock, align.spans["imu"].span if "imu" in align.spans else None)
    loop = _Loop(sessions, encoder, sink, clock, rate=rate, max_batch=max_batch, max_wait_s=max_wait_s)
    loop.run(streams)
    results = loop.finish()
    return InProcessResult(
        sessions=[r.to_dict() for r in results], elapsed_s=clock() - loop.wall0, stages=loop.stages.summary(),
        latencies=list(loop.latencies), items=dict(encoder.items), forward_s=dict(encoder.forward_s),
        batch_sizes=dict(encoder.batch_sizes), source_cpu_s={f"{s.session}/{s.spec.id}": s.cpu_s for s in streams},
    )
