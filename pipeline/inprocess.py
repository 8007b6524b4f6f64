"""The whole pipeline in one process, without Ray: decode -> align -> preprocess -> encode -> publish.

The same parts as the Ray graph (``sources.replay.open_source`` with its frame selection, the
:class:`sources.guard.StreamGuard` of every stream, :class:`pipeline.align.Aligner`,
:func:`encoders.preprocess.prepare`, ``model.encode``, any :class:`sinks.memory.SinkBase` such as
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

from pipeline.align import AlignConfig, Aligner, Window
from pipeline.config import EncodersConfig, ReplayConfig, SourcesConfig
from pipeline.metrics import StageRecorder
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
    from pipeline.align import frame_selector

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
    sessions: list[dict[str, Any]]  # per session: windows, counts, dropped, missing, errors
    elapsed_s: float
    stages: dict[str, dict[str, float]]  # StageRecorder.summary()
    latencies: list[float]  # total latency per embedding (bounded to the last 100k)
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
        self.done = False
        self.error: str | None = None


class _InProcessRun:
    """The state of one :func:`run_inprocess` call: its streams, aligners, released windows and counters."""

    def __init__(self, model: Any, sink: Any, clock: Callable[[], float], max_batch: int, device: Any) -> None:
        self.model, self.sink, self.clock, self.max_batch, self.device = model, sink, clock, max_batch, device
        self.aligners: dict[str, Aligner] = {}
        self.selectors: dict[str, dict[str, Any]] = {}
        self.streams: list[_Stream] = []
        self.recorder = StageRecorder()
        self.latencies: collections.deque = collections.deque(maxlen=100_000)
        self.session_latencies: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=100_000))
        self.imu_span: float | None = None  # what an IMU window covers: the encoder resamples over it
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.errors: dict[str, dict[str, str]] = collections.defaultdict(dict)
        self.source_dropped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.items_n: collections.Counter = collections.Counter()
        self.forward_s: collections.Counter = collections.Counter()
        self.batch_sizes: dict[str, list[int]] = collections.defaultdict(list)
        self.released: list[tuple[Window, float]] = []  # (window, t_release)
        self.wall0 = clock()

    def open(self, specs: Sequence[SessionSpec], align: AlignConfig, select_frames: bool, max_gap_s: float,
             **source_options: Any) -> None:
        from sources.guard import StreamGuard
        from sources.replay import open_source

        self.imu_span = align.spans["imu"].span if "imu" in align.spans else None
        for spec in specs:
            sm = {s.id: s.modality for s in spec.streams}
            self.aligners[spec.name] = Aligner(spec.name, sm, align, clock=self.clock)
            self.selectors[spec.name] = _selectors(spec, align) if select_frames else {}
            self.sink.start_session(spec.name, sm, self.model.config.name, int(self.model.out_dim))
            for s in spec.streams:
                src = open_source(s, select=self.selectors[spec.name].get(s.id), **source_options)
                guard = StreamGuard(spec.name, s.id, s.modality, max_gap_s=max_gap_s)
                self.streams.append(_Stream(spec.name, s, src, guard))
        self.wall0 = self.clock()  # the replay clock starts once every source is open

    def read(self, st: _Stream, rate: float) -> bool:
        """Push the next chunk of ``st`` to its aligner; ``False`` once the stream has ended."""
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
        al = self.aligners[st.session]
        if chunk is None:
            self._end_stream(st, al)
            return False
        chunk = st.guard.apply(chunk)  # clock jumps, non-finite data: dropped and counted
        if len(chunk) == 0:
            return True
        if rate > 0:
            if st.t_first is None:
                st.t_first = float(np.nanmin(chunk.t))
            delay = self.wall0 + (chunk.known_at() - st.t_first) / rate - self.clock()
            if delay > 0:
                time.sleep(delay)
        chunk.t_ingest = self.clock()
        windows = al.push(chunk)
        _tell_origin(self.selectors[st.session], al)
        t_rel = self.clock()
        self.released.extend((w, t_rel) for w in windows)
        return True

    def _end_stream(self, st: _Stream, al: Aligner) -> None:
        if st.error:
            self.errors[st.session][st.spec.id] = st.error
        for reason, n in st.guard.merge_into(getattr(st.source, "dropped", {}) or {}).items():
            self.source_dropped[st.session][f"{st.spec.id}:{reason}"] += int(n)
        t_rel = self.clock()
        self.released.extend((w, t_rel) for w in al.end_stream(st.spec.id, st.error))

    def encode_and_publish(self) -> None:
        if not self.released:
            return
        emb, fwd = self._encode()
        # Windows are released in order per session, so publishing them as released keeps order.
        for w, t_rel in self.released:
            records = [EmbeddingRecord(session=it.session, stream=it.stream, modality=it.modality, window=it.window,
                                       t_start=it.t_start, t_end=it.t_end, embedding=emb[id(it)].astype(np.float32),
                                       t_ingest=it.t_ingest) for it in w.items]
            if records:
                self.sink.publish(records)
            t_pub = self.clock()
            for it in w.items:
                t0, t1 = fwd[id(it)]
                self.recorder.record(it.t_ingest, t_rel, t0, t1, t_pub, t_first_ingest=it.t_first_ingest)
                self.latencies.append(t_pub - it.t_ingest)
                self.session_latencies[w.session].append(t_pub - it.t_ingest)
                self.counts[w.session][it.modality] += 1
        self.released.clear()

    def _encode(self) -> tuple[dict[int, np.ndarray], dict[int, tuple[float, float]]]:
        """Embeddings of every released item (by ``id``) and the (start, end) of its forward."""
        from encoders.preprocess import prepare

        by_mod: dict[str, list[Any]] = collections.defaultdict(list)
        for w, _ in self.released:
            for it in w.items:
                by_mod[it.modality].append(it)
        emb: dict[int, np.ndarray] = {}
        fwd: dict[int, tuple[float, float]] = {}
        for modality, its in by_mod.items():
            for lo in range(0, len(its), self.max_batch):
                part = its[lo:lo + self.max_batch]
                t0 = self.clock()
                x = prepare(modality, [it.payload for it in part], self.device, config=self.model.config,
                            imu_duration=self.imu_span)
                rows = self.model.encode(modality, x).float().cpu().numpy()
                t1 = self.clock()
                self.items_n[modality] += len(part)
                self.forward_s[modality] += t1 - t0
                self.batch_sizes[modality].append(len(part))
                for it, row in zip(part, rows):
                    emb[id(it)] = row
                    fwd[id(it)] = (t0, t1)
        return emb, fwd

    def result(self) -> InProcessResult:
        """End every session at the sink and sum the run up."""
        sessions = []
        for name, al in self.aligners.items():
            lat = np.array(self.session_latencies[name]) if self.session_latencies[name] else np.zeros(1)
            dropped: collections.Counter = collections.Counter()
            for (stream, reason), n in al.dropped.items():
                dropped[f"{stream}:{reason}"] += n
            dropped.update(self.source_dropped[name])
            counts, errors = dict(self.counts[name]), dict(self.errors[name])
            self.sink.end_session(name, counts=counts, windows=al.windows_released, dropped=dict(dropped),
                                  missing=dict(al.missing), errors=errors)
            sessions.append({"session": name, "windows": al.windows_released, "counts": counts,
                             "dropped": dict(dropped), "missing": dict(al.missing), "errors": errors,
                             "latency_p50_s": float(np.percentile(lat, 50)),
                             "latency_p99_s": float(np.percentile(lat, 99))})
        return InProcessResult(
            sessions=sessions, elapsed_s=self.clock() - self.wall0, stages=self.recorder.summary(),
            latencies=list(self.latencies), items=dict(self.items_n), forward_s=dict(self.forward_s),
            batch_sizes=dict(self.batch_sizes), source_cpu_s={f"{s.session}/{s.spec.id}": s.cpu_s for s in self.streams},
        )


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
    (sources/guard.py; its drops are counted with the source's).
    """
    import torch

    dev = torch.device(device) if device is not None else model.device
    r = _InProcessRun(model, sink, clock, max_batch, dev)
    r.open(specs, align or AlignConfig(), select_frames, max_gap_s, chunk_seconds=chunk_seconds,
           video_size=video_size, max_pixels=max_pixels)
    live = list(r.streams)
    while live:
        for st in list(live):
            if not r.read(st, rate):
                live.remove(st)
        # The encoders' batching rule: a full batch, or the oldest released window waited long enough.
        if len(r.released) >= max_batch or (r.released and clock() - r.released[0][1] >= max_wait_s):
            r.encode_and_publish()
    r.encode_and_publish()
    return r.result()
