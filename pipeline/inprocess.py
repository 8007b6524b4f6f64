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
from pipeline.metrics import StageRecorder
from sinks.protocol import EmbeddingRecord
from sources.session import SessionSpec

__all__ = ["InProcessResult", "run_inprocess", "session_windows"]

log = logging.getLogger(__name__)


def session_windows(spec: SessionSpec, align: AlignConfig | None = None, *, select_frames: bool = False,
                    max_gap_s: float = 60.0, **source_options: Any) -> list[Window]:
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


def run_inprocess(
    specs: Sequence[SessionSpec],
    model: Any,
    sink: Any,
    *,
    align: AlignConfig | None = None,
    chunk_seconds: float = 0.5,
    video_size: int = 224,
    max_pixels: int = 8192 * 8192,
    max_batch: int = 32,
    max_wait_s: float = 0.02,
    rate: float = 0.0,
    device: Any = None,
    clock: Callable[[], float] = time.time,
    select_frames: bool = True,
    max_gap_s: float = 60.0,
) -> InProcessResult:
    """Replay ``specs`` through ``model`` into ``sink`` (already bound/constructed; not closed here).

    A stream that fails is ended with its error and the others go on, as in the Ray graph.
    ``select_frames``: only frames some window can pick are scaled / decoded, as the graph's
    ``sources.select_frames`` (docs/alignment.md). ``max_gap_s``: the clock-jump and
    non-finite-data guard of every stream, as the graph's ``sources.max_gap_s``
    (sources/guard.py; its drops are counted with the source's).
    """
    import torch

    from encoders.preprocess import prepare
    from sources.guard import StreamGuard
    from sources.replay import open_source

    align = align or AlignConfig()
    dev = torch.device(device) if device is not None else model.device
    info_model = model.config.name
    dim = int(model.out_dim)
    aligners: dict[str, Aligner] = {}
    selectors: dict[str, dict[str, Any]] = {}
    streams: list[_Stream] = []
    for spec in specs:
        sm = {s.id: s.modality for s in spec.streams}
        aligners[spec.name] = Aligner(spec.name, sm, align, clock=clock)
        selectors[spec.name] = _selectors(spec, align) if select_frames else {}
        sink.start_session(spec.name, sm, info_model, dim)
        for s in spec.streams:
            src = open_source(s, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels,
                              select=selectors[spec.name].get(s.id))
            streams.append(_Stream(spec.name, s, src, StreamGuard(spec.name, s.id, s.modality, max_gap_s=max_gap_s)))

    recorder = StageRecorder()
    latencies: collections.deque = collections.deque(maxlen=100_000)
    counts: dict[str, collections.Counter] = {n: collections.Counter() for n in aligners}
    errors: dict[str, dict[str, str]] = {n: {} for n in aligners}
    source_dropped: dict[str, collections.Counter] = {n: collections.Counter() for n in aligners}
    items_n: collections.Counter = collections.Counter()
    forward_s: collections.Counter = collections.Counter()
    batch_sizes: dict[str, list[int]] = collections.defaultdict(list)
    released: list[tuple[Window, float]] = []  # (window, t_release)
    wall0 = clock()

    def encode_and_publish() -> None:
        if not released:
            return
        by_mod: dict[str, list[Any]] = collections.defaultdict(list)
        for w, _ in released:
            for it in w.items:
                by_mod[it.modality].append(it)
        emb: dict[int, np.ndarray] = {}
        fwd: dict[int, tuple[float, float]] = {}
        for modality, its in by_mod.items():
            for lo in range(0, len(its), max_batch):
                part = its[lo:lo + max_batch]
                t0 = clock()
                x = prepare(modality, [it.payload for it in part], dev)
                rows = model.encode(modality, x).float().cpu().numpy()
                t1 = clock()
                items_n[modality] += len(part)
                forward_s[modality] += t1 - t0
                batch_sizes[modality].append(len(part))
                for it, row in zip(part, rows):
                    emb[id(it)] = row
                    fwd[id(it)] = (t0, t1)
        # Windows are released in order per session, so publishing them as released keeps order.
        for w, t_rel in released:
            records = [EmbeddingRecord(session=it.session, stream=it.stream, modality=it.modality, window=it.window,
                                       t_start=it.t_start, t_end=it.t_end, embedding=emb[id(it)].astype(np.float32),
                                       t_ingest=it.t_ingest) for it in w.items]
            if records:
                sink.publish(records)
            t_pub = clock()
            for it in w.items:
                t0, t1 = fwd[id(it)]
                recorder.record(it.t_ingest, t_rel, t0, t1, t_pub, t_first_ingest=it.t_first_ingest)
                latencies.append(t_pub - it.t_ingest)
                counts[w.session][it.modality] += 1
        released.clear()

    live = list(streams)
    while live:
        for st in list(live):
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
            al = aligners[st.session]
            if chunk is None:
                live.remove(st)
                if st.error:
                    errors[st.session][st.spec.id] = st.error
                for reason, n in st.guard.merge_into(getattr(st.source, "dropped", {}) or {}).items():
                    source_dropped[st.session][f"{st.spec.id}:{reason}"] += int(n)
                t_rel = clock()
                released.extend((w, t_rel) for w in al.end_stream(st.spec.id, st.error))
                continue
            chunk = st.guard.apply(chunk)  # clock jumps, non-finite data: dropped and counted
            if len(chunk) == 0:
                continue
            if rate > 0:
                if st.t_first is None:
                    st.t_first = float(np.nanmin(chunk.t))
                delay = wall0 + (chunk.known_at() - st.t_first) / rate - clock()
                if delay > 0:
                    time.sleep(delay)
            chunk.t_ingest = clock()
            windows = al.push(chunk)
            _tell_origin(selectors[st.session], al)
            t_rel = clock()
            released.extend((w, t_rel) for w in windows)
        # The encoders' batching rule: a full batch, or the oldest released window waited long enough.
        if len(released) >= max_batch or (released and clock() - released[0][1] >= max_wait_s):
            encode_and_publish()
    encode_and_publish()

    sessions = []
    for name, al in aligners.items():
        dropped: collections.Counter = collections.Counter()
        for (stream, reason), n in al.dropped.items():
            dropped[f"{stream}:{reason}"] += n
        dropped.update(source_dropped[name])
        sink.end_session(name, counts=dict(counts[name]), windows=al.windows_released, dropped=dict(dropped),
                         missing=dict(al.missing), errors=dict(errors[name]))
        lat = np.array([v for v in latencies]) if latencies else np.zeros(1)
        sessions.append({"session": name, "windows": al.windows_released, "counts": dict(counts[name]),
                         "dropped": dict(dropped), "missing": dict(al.missing), "errors": dict(errors[name]),
                         "latency_p50_s": float(np.percentile(lat, 50)),
                         "latency_p99_s": float(np.percentile(lat, 99))})
    return InProcessResult(
        sessions=sessions, elapsed_s=clock() - wall0, stages=recorder.summary(), latencies=list(latencies),
        items=dict(items_n), forward_s=dict(forward_s), batch_sizes=dict(batch_sizes),
        source_cpu_s={f"{s.session}/{s.spec.id}": s.cpu_s for s in streams},
    )
