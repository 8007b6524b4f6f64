"""The store's tables besides ``embeddings``: ``thumbnails``, ``captions`` and ``events``
(docs/store.md): their schemas, keys and row types, and :class:`EventPairer`, which turns a
trigger's ``start`` and ``end`` into the one row the ``events`` table keeps of the event.

Every row has ``session`` (the writer counts rows per session) and ``table`` (where it goes).
Writes are upserts on each table's key, as for ``embeddings``, so a replay keeps one row per key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

__all__ = ["CAPTIONS", "EVENTS", "THUMBNAILS", "TABLE_KEYS", "TABLE_SCHEMAS", "CaptionRow", "EventPairer",
           "EventRow", "ThumbnailRow", "TriggerMark", "arrow_rows"]

THUMBNAILS = "thumbnails"
CAPTIONS = "captions"
EVENTS = "events"

_WINDOW = [("model", pa.string()), ("session", pa.string()), ("stream", pa.string()), ("modality", pa.string()),
           ("window", pa.int64()), ("t_start", pa.float64()), ("t_end", pa.float64())]

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    THUMBNAILS: pa.schema(_WINDOW + [("width", pa.int32()), ("height", pa.int32()), ("jpeg", pa.binary())]),
    CAPTIONS: pa.schema(_WINDOW + [("text", pa.string())]),
    EVENTS: pa.schema([("model", pa.string()), ("session", pa.string()), ("trigger", pa.string()),
                       ("modality", pa.string()), ("window", pa.int64()), ("t_start", pa.float64()),
                       ("t_end", pa.float64()), ("score", pa.float64()), ("score_kind", pa.string()),
                       ("run_id", pa.string())]),
}
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    THUMBNAILS: ("model", "session", "modality", "window"),
    CAPTIONS: ("model", "session", "modality", "window"),
    EVENTS: ("model", "session", "trigger", "modality", "t_start"),
}


@dataclass(frozen=True)
class ThumbnailRow:
    """A JPEG of one vision window's middle frame (``width`` x ``height`` pixels)."""

    model: str
    session: str
    stream: str
    modality: str
    window: int
    t_start: float
    t_end: float
    width: int
    height: int
    jpeg: bytes
    table = THUMBNAILS


@dataclass(frozen=True)
class CaptionRow:
    """The caption text of one text window."""

    model: str
    session: str
    stream: str
    modality: str
    window: int
    t_start: float
    t_end: float
    text: str
    table = CAPTIONS


@dataclass(frozen=True)
class EventRow:
    """One trigger event: ``window`` is the window whose score started it (-1 when its start was
    not seen), ``t_start``/``t_end`` its span in stream time, ``score`` its peak."""

    model: str
    session: str
    trigger: str
    modality: str
    window: int
    t_start: float
    t_end: float
    score: float
    score_kind: str
    run_id: str
    table = EVENTS


@dataclass(frozen=True)
class TriggerMark:
    """A trigger event as the wire carries it (``evt/<session>/<trigger>``, docs/protocol.md):
    the attributes :meth:`EventPairer.add` reads, which a ``pipeline.triggers.TriggerEvent`` has too."""

    trigger: str
    stream: str
    modality: str
    kind: str  # "start" | "end"
    window: int
    t_start: float
    t_end: float
    score: float
    score_kind: str = "cosine"

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> "TriggerMark":
        """From a decoded ``evt/`` message's payload (``score_kind`` absent: ``cosine``)."""
        return cls(str(p["trigger"]), str(p["stream"]), str(p["modality"]), str(p["event"]), int(p["window"]),
                   float(p["t_start"]), float(p["t_end"]), float(p["score"]), str(p.get("score_kind") or "cosine"))


class EventPairer:
    """``start`` and ``end`` of each event into one :class:`EventRow`, made when the event ends.

    An event is one (session, trigger, stream) from its ``start`` to the next ``end``: its window
    is the start's, its span and peak score the end's. A session's evaluator ends every open event
    when the session ends (``reason: stream_end``), so that end closes it like any other;
    :meth:`end_session` writes what is still open after that (an ``end`` lost on the way) with the
    span its start knew. An ``end`` whose ``start`` was not seen (a consumer that joined mid-event,
    a publisher restarted mid-event) still makes its row, with window -1."""

    def __init__(self, run_id: str = "") -> None:
        self.run_id = run_id
        self._open: dict[tuple[str, str, str], tuple[str, Any]] = {}  # (session, trigger, stream) -> (model, start)

    def add(self, session: str, model: str, events: Iterable[Any]) -> list[EventRow]:
        """``events`` of ``session`` (each with ``trigger``, ``stream``, ``modality``, ``kind``,
        ``window``, ``t_start``, ``t_end``, ``score``, optional ``score_kind``), in the order
        they were published; the rows of the events they end."""
        rows = []
        for e in events:
            key = (session, e.trigger, e.stream)
            if e.kind == "start":
                self._open[key] = (model, e)
                continue
            _, start = self._open.pop(key, (model, None))
            window = int(start.window) if start is not None and start.t_start == e.t_start else -1
            rows.append(self._row(session, model, e, window, e.t_end, e.score))
        return rows

    def end_session(self, session: str) -> list[EventRow]:
        """Rows of ``session``'s events still open (their ``end`` never came), as far as they are known."""
        keys = [k for k in self._open if k[0] == session]
        rows = []
        for k in keys:
            model, start = self._open.pop(k)
            rows.append(self._row(session, model, start, int(start.window), start.t_end, start.score))
        return rows

    def _row(self, session: str, model: str, e: Any, window: int, t_end: float, score: float) -> EventRow:
        return EventRow(model, session, str(e.trigger), str(e.modality), window, float(e.t_start), float(t_end),
                        float(score), str(getattr(e, "score_kind", "") or "cosine"), self.run_id)


def arrow_rows(table: str, rows: list[Any]) -> pa.Table:
    """``rows`` of ``table`` as an Arrow table, the last row of each key kept (a merge must not see a key twice)."""
    schema, key = TABLE_SCHEMAS[table], TABLE_KEYS[table]
    last = {tuple(getattr(r, k) for k in key): r for r in rows}
    cols = {f.name: [getattr(r, f.name) for r in last.values()] for f in schema}
    return pa.table(cols, schema=schema)
