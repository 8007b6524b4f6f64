"""The session timeline from a store: ``python -m pipeline timeline URI --session S --out FILE``
writes the page a run's ``timeline: FILE`` writes (:mod:`sinks.timeline`), from what the store
holds (docs/triggers.md):

* lanes: every stored window of the session, per stream, with each trigger's score on it (the
  triggers given by ``--config`` or the trigger flags, evaluated as ``triggers URI`` does,
  :mod:`pipeline.store_triggers`), and their events;
* without triggers: the windows, and the events the run stored (table ``events``);
* captions from table ``captions`` and vision thumbnails from table ``thumbnails``, where the store
  has them (a table it does not have reads as empty). Thumbnails are thinned to at most
  ``MAX_THUMBS`` per stream by the rule a run's timeline uses and re-encoded at its size, at most
  ``THUMB_MAX_CHARS`` each, so a one-hour session at one window a second stays under 8 MB.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

from pipeline.search import QueryError, Store
from pipeline.session_triggers import MAX_THUMBS, TimelineTrace, TriggerSetup, jpeg_thumbnail
from pipeline.store_triggers import (add_trigger_flags, evaluate, run_command, session_records, store_setup,
                                     trigger_config, wanted_sessions)
from sinks.store import CAPTIONS, EVENTS, THUMBNAILS, EmbeddingStore, where_clause

__all__ = ["add_timeline_args", "store_timeline"]

log = logging.getLogger(__name__)


# Per thumbnail, base64 characters: 900 of them (MAX_THUMBS) and plotly.js (4.8 MB) leave room
# for six lanes of an hour's windows within 8 MB, however noisy the frames.
THUMB_MAX_CHARS = 2000


def store_timeline(store: EmbeddingStore, model: str, session: str, setup: TriggerSetup | None = None,
                   modalities: Sequence[str] = (), max_thumbs: int = MAX_THUMBS) -> dict[str, Any]:
    """What :func:`sinks.timeline.render_timeline` draws for ``session``, from the store."""
    records = session_records(store, model, session, modalities)
    trace = TimelineTrace(session, setup if setup is not None else TriggerSetup(rules=(), prompts={}), max_thumbs)
    for rec in records:
        trace.window(rec)
    if setup is not None:
        trace.events(evaluate(setup, session, records, trace))
    else:
        _stored_events(store, where_clause({"model": [model], "session": [session], "modality": list(modalities)}),
                       trace)
    if not modalities or "text" in modalities:
        _captions(store, where_clause({"model": [model], "session": [session]}), trace)
    if not modalities or "vision" in modalities:
        _thumbnails(store, where_clause({"model": [model], "session": [session]}), trace)
    return trace.data()


def _optional_rows(store: EmbeddingStore, table: str, where: str | None, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of one of the tables the page can do without; one it cannot read (not the layout of
    docs/store.md) is left out with a warning rather than losing the page."""
    try:
        return store.read(table, where, columns).to_pylist()
    except Exception as exc:  # LanceDB raises its own kinds for a missing column or a bad file
        log.warning("store %s: table '%s' cannot be read, left out of the timeline: %s", store.uri, table,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []


def _sorted_rows(store: EmbeddingStore, table: str, where: str | None, columns: list[str]) -> list[dict[str, Any]]:
    return sorted(_optional_rows(store, table, where, columns), key=lambda r: (r["stream"], r["window"]))


def _captions(store: EmbeddingStore, where: str | None, trace: TimelineTrace) -> None:
    for r in _sorted_rows(store, CAPTIONS, where, ["stream", "window", "t_start", "t_end", "text"]):
        if r["text"]:
            trace.caption(r["stream"], float(r["t_start"]), float(r["t_end"]), str(r["text"]))


def _thumbnails(store: EmbeddingStore, where: str | None, trace: TimelineTrace) -> None:
    """The stored JPEGs of the windows the page keeps (the trace's rule, run first on the window
    numbers alone), re-encoded at the page's size: only the kept ones are decoded."""
    rows = _sorted_rows(store, THUMBNAILS, where, ["stream", "window", "t_start", "t_end", "jpeg"])
    for r in rows:
        trace.thumb(r["stream"], int(r["window"]), float(r["t_start"]), float(r["t_end"]), lambda: "")
    stored = {(r["stream"], int(r["window"])): r["jpeg"] for r in rows}
    for stream, kept in trace.thumbs.items():
        jpegs = [_reencoded(stored[(stream, k["window"])], f"{stream} window {k['window']}") for k in kept]
        kept[:] = [{**k, "jpeg": j} for k, j in zip(kept, jpegs) if j is not None]


def _reencoded(jpeg: bytes | None, where: str) -> str | None:
    """A stored JPEG at the timeline's thumbnail size (base64), or ``None`` where it does not decode."""
    import av

    try:
        cc = av.CodecContext.create("mjpeg", "r")
        frames = cc.decode(av.Packet(bytes(jpeg or b"")))
        if not frames:
            raise ValueError("no picture")
        return jpeg_thumbnail(frames[0].to_ndarray(format="rgb24"), max_chars=THUMB_MAX_CHARS)
    except (av.FFmpegError, ValueError) as exc:
        log.warning("thumbnail of %s does not decode, left out: %s", where, exc)
        return None


def _stored_events(store: EmbeddingStore, where: str | None, trace: TimelineTrace) -> None:
    """The run's events (table ``events``) as spans; each shown on its modality's first stream."""
    rows = _optional_rows(store, EVENTS, where, ["trigger", "modality", "window", "t_start", "t_end", "score",
                                                 "score_kind"])
    streams = {lane["modality"]: s for s, lane in sorted(trace.lanes.items(), reverse=True)}
    named = {t["name"] for t in trace.triggers}
    for r in sorted(rows, key=lambda r: (r["t_start"], r["trigger"], r["modality"])):
        if r["trigger"] not in named:
            named.add(r["trigger"])
            trace.triggers.append({"name": r["trigger"], "prompt": "stored events", "score": r["score_kind"],
                                   "on": None, "off": None})
        trace.spans.append({"trigger": r["trigger"], "stream": streams.get(r["modality"], r["modality"]),
                            "modality": r["modality"], "t_start": float(r["t_start"]), "t_end": float(r["t_end"]),
                            "score": round(float(r["score"]), 4), "window": int(r["window"]), "reason": ""})


# -- the command -------------------------------------------------------------------------------------

def add_timeline_args(sub: Any) -> None:
    p = sub.add_parser("timeline", help="write a stored session's timeline page (one self-contained HTML file)",
                       description="Lanes per modality with each trigger's score, event spans, captions and "
                                   "thumbnails, from the store. Without a trigger: the events the run stored. "
                                   "Exit codes: 0 written, 2 bad trigger, session, store or --out (empty, a "
                                   "folder, or below a file), 4 model weights unavailable, 5 the page cannot be "
                                   "written (nothing is left behind).")
    p.add_argument("uri", help="the store (store.uri of the run)")
    p.add_argument("--session", required=True, metavar="S", help="the session to draw")
    add_trigger_flags(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    p.set_defaults(fn=lambda args: run_command(lambda: _cmd_timeline(args)))


def _cmd_timeline(args: argparse.Namespace) -> int:
    import sys

    from sinks.timeline import page_path_problem, write_timeline_html

    problem = page_path_problem(args.out)
    if problem is not None:
        raise QueryError(f"--out {args.out!r}: {problem}")
    cfg = trigger_config(args)
    store = Store(args.uri)
    model = store.model_row(args.model)["model"]
    (session,) = wanted_sessions(store.store, model, [args.session])
    setup = store_setup(store, cfg, model, flags=args.config is None)
    data = store_timeline(store.store, model, session, setup, args.modality)
    try:
        path = write_timeline_html(Path(args.out), data)
    except OSError as exc:
        print(f"error: cannot write the timeline to {args.out}: {exc}", file=sys.stderr)
        return 5
    print(path)
    return 0
