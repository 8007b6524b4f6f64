"""What one session did: counts, latencies, drops, errors; one implementation for every runtime.

:class:`SessionStats` is filled while a session runs (the Ray graph's
:class:`pipeline.session_actor.AlignerActor`, the one-process :func:`pipeline.inprocess.run_inprocess`);
:meth:`SessionStats.result` gives the typed :class:`SessionResult`, whose :meth:`SessionResult.to_dict`
is the session summary of ``RunResult.sessions`` and :meth:`SessionResult.lines` the CLI's text.

Latency is per embedding: published minus entered (``t_ingest``), wall-clock seconds; the
percentiles are over the session's own most recent ``keep`` embeddings (bounded memory).

Drops are merged into one map ``<stream>:<reason>`` (``<modality>:encoder_error`` for items an
encoder never returned, ``<stream>:bad_values`` for windows whose out-of-range samples the
encoder left out) from every part that counts some: the aligner (``late``, ``duplicate``),
the sources (their own reasons and the guard's), live shedding, the publish order
(``duplicate_window``) and the encoders.

A stream's error and the publisher's are kept apart: ``errors`` maps streams to what failed
them (the ``end`` message's ``errors``), ``publisher_error`` says the publisher was lost for
good. The summary's ``errors`` holds both (``"publisher"`` for the latter), so either makes the
run exit 3.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["SessionResult", "SessionStats", "merge_dropped"]

PUBLISHER = "publisher"  # the summary's ``errors`` key for a lost publisher


def merge_dropped(aligner_dropped: Mapping[tuple[str, str], int], *parts: Mapping[str, int]) -> dict[str, int]:
    """One ``<stream>:<reason>`` map from the aligner's ``(stream, reason)`` counts and ``parts``."""
    out: collections.Counter[str] = collections.Counter()
    for (stream, reason), n in aligner_dropped.items():
        out[f"{stream}:{reason}"] += int(n)
    for part in parts:
        for key, n in part.items():
            out[key] += int(n)
    return dict(out)


@dataclass(frozen=True)
class SessionResult:
    """A session's summary. ``latency_p50_s``/``latency_p99_s`` are NaN when unknown (the
    session's process died), 0.0 when nothing was published."""

    session: str
    windows: int
    counts: dict[str, int]
    dropped: dict[str, int]
    missing: dict[str, int]
    errors: dict[str, str]  # stream -> error
    latency_p50_s: float
    latency_p99_s: float
    encode_retries: int = 0
    publisher_restarts: int = 0
    publisher_error: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)  # pipeline.metrics.StageRecorder.summary()
    recording: str | None = None  # live sessions recorded with ``record``: the folder
    recording_error: str | None = None  # the recording could not be written: why, and where its files are
    store: dict[str, Any] | None = None  # with store.uri: uri, rows written, not_written, pending, tables, error
    store_error: str | None = None  # the store failed or rows were not written: why, and how many
    timeline_error: str | None = None  # the timeline page (``timeline: FILE``) could not be written: why, and where
    triggers: dict[str, dict[str, float]] = field(default_factory=dict)  # trigger -> events, duration_s (stream s)
    interrupted: bool = False  # a replay stopped (Ctrl-C, SIGTERM) before its streams' end

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.publisher_error is not None

    def all_errors(self) -> dict[str, str]:
        """Stream errors, plus ``"publisher"`` when the publisher was lost."""
        out = dict(self.errors)
        if self.publisher_error is not None:
            out[PUBLISHER] = self.publisher_error
        return out

    def to_dict(self) -> dict[str, Any]:
        """The session summary as ``RunResult.sessions`` holds it."""
        out = {"session": self.session, "windows": self.windows, "counts": dict(self.counts),
               "dropped": dict(self.dropped), "missing": dict(self.missing), "errors": self.all_errors(),
               "latency_p50_s": self.latency_p50_s, "latency_p99_s": self.latency_p99_s,
               "encode_retries": self.encode_retries, "publisher_restarts": self.publisher_restarts,
               "stages": self.stages}
        if self.recording is not None:
            out["recording"] = self.recording
        if self.recording_error is not None:
            out["recording_error"] = self.recording_error
        if self.store is not None:
            out["store"] = dict(self.store)
        if self.store_error is not None:
            out["store_error"] = self.store_error
        if self.timeline_error is not None:
            out["timeline_error"] = self.timeline_error
        if self.triggers:
            out["triggers"] = {k: dict(v) for k, v in self.triggers.items()}
        if self.interrupted:
            out["interrupted"] = True
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SessionResult":
        errors = dict(d.get("errors") or {})
        publisher_error = errors.pop(PUBLISHER, None)
        return cls(session=d["session"], windows=int(d["windows"]), counts=dict(d["counts"]),
                   dropped=dict(d.get("dropped") or {}), missing=dict(d.get("missing") or {}), errors=errors,
                   latency_p50_s=float(d["latency_p50_s"]), latency_p99_s=float(d["latency_p99_s"]),
                   encode_retries=int(d.get("encode_retries") or 0),
                   publisher_restarts=int(d.get("publisher_restarts") or 0), publisher_error=publisher_error,
                   stages=dict(d.get("stages") or {}), recording=d.get("recording"), recording_error=d.get("recording_error"),
                   store=d.get("store"), store_error=d.get("store_error"), timeline_error=d.get("timeline_error"),
                   triggers=dict(d.get("triggers") or {}),
                   interrupted=bool(d.get("interrupted")))

    def lines(self) -> list[str]:
        """The session's lines of the CLI summary."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "none"
        latency = ("latency unknown" if math.isnan(self.latency_p50_s)  # its process died (run.py)
                   else f"latency p50 {self.latency_p50_s * 1000:.0f} ms, p99 {self.latency_p99_s * 1000:.0f} ms")
        windows = f"INTERRUPTED after {self.windows} windows" if self.interrupted else f"{self.windows} windows"
        out = [f"  {self.session}: {windows}; embeddings: {counts}; {latency}"]
        if self.missing:
            out.append("    windows without: " + ", ".join(f"{k} {v}" for k, v in sorted(self.missing.items())))
        if self.dropped:
            out.append("    dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        for stream, err in sorted(self.all_errors().items()):  # docs/guarantees.md: "FAILED stream 'publisher'" too
            out.append(f"    FAILED stream '{stream}': {err}")
        if self.recording:
            out.append(f"    recorded to {self.recording}")
        if self.recording_error:
            out.append(f"    RECORDING FAILED: {self.recording_error}")
        if self.store_error:
            out.append(f"    STORE FAILED: {self.store_error}")
        elif self.store is not None:
            tables = ", ".join(f"{t} {c.get('rows', 0)}" for t, c in sorted((self.store.get("tables") or {}).items()))
            out.append(f"    stored {self.store.get('rows', 0)} rows in {self.store.get('uri')}"
                       + (f" (and {tables})" if tables else ""))
        if self.timeline_error:
            out.append(f"    TIMELINE FAILED: {self.timeline_error}")
        if self.triggers:
            out.append("    triggers: " + ", ".join(f"{k} {v['events']} event(s), {v['duration_s']:.1f} s"
                                                    for k, v in sorted(self.triggers.items())))
        if self.publisher_restarts:
            out.append(f"    publisher restarted: resumed {self.publisher_restarts} time(s); seq gaps mark what was lost")
        return out


class SessionStats:
    """Counters of one running session; :meth:`result` summarises them."""

    def __init__(self, session: str, keep: int = 100_000) -> None:
        self.session = session
        self.counts: collections.Counter[str] = collections.Counter()  # published per modality
        self.latencies: collections.deque[float] = collections.deque(maxlen=keep)
        self.errors: dict[str, str] = {}  # stream -> error
        self.publisher_error: str | None = None
        self.source_dropped: collections.Counter[str] = collections.Counter()  # "<stream>:<reason>"

    @property
    def published(self) -> int:
        return sum(self.counts.values())

    def record_published(self, items: Iterable[tuple[str, float]], t_pub: float) -> None:
        """``(modality, t_ingest)`` of every embedding published at ``t_pub``."""
        for modality, t_ingest in items:
            self.counts[modality] += 1
            self.latencies.append(t_pub - t_ingest)

    def stream_ended(self, stream: str, error: str | None, dropped: Mapping[str, int] | None) -> None:
        """A stream's end as its source reports it: its error, and what the source dropped."""
        if error:
            self.errors[stream] = error
        for reason, n in (dropped or {}).items():
            self.source_dropped[f"{stream}:{reason}"] += int(n)

    def publisher_lost(self, error: str) -> None:
        self.publisher_error = error

    def result(self, *, windows: int, dropped: Mapping[str, int], missing: Mapping[str, int],
               encode_retries: int = 0, publisher_restarts: int = 0,
               stages: Mapping[str, Any] | None = None,
               triggers: Mapping[str, Mapping[str, float]] | None = None, interrupted: bool = False) -> SessionResult:
        """The summary; ``dropped`` is every part's drops (:func:`merge_dropped`), this one's
        ``source_dropped`` among them."""
        lat = np.asarray(self.latencies, dtype=np.float64) if self.latencies else np.zeros(1)
        return SessionResult(
            session=self.session, windows=int(windows), counts=dict(self.counts), dropped=dict(dropped),
            missing=dict(missing), errors=dict(self.errors),
            latency_p50_s=float(np.percentile(lat, 50)), latency_p99_s=float(np.percentile(lat, 99)),
            encode_retries=int(encode_retries), publisher_restarts=int(publisher_restarts),
            publisher_error=self.publisher_error, stages=dict(stages or {}),
            triggers={k: dict(v) for k, v in (triggers or {}).items()}, interrupted=bool(interrupted))
