"""The embedding store in a run: the writer's options from the config, its reports in the
summaries; and ``python -m pipeline store``, the same sink fed by a SUB socket on another machine.

The writer itself (``sinks.store.StoreWriter``) runs in the publisher actor
(pipeline/publisher_actor.py); docs/store.md describes the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.cli_types import number_type
from pipeline.config import RunConfig, tcp_port_problem

__all__ = ["add_store_args", "consume", "store_lost", "store_options", "store_results"]

log = logging.getLogger(__name__)


def store_options(cfg: RunConfig, model_opts: dict[str, Any], info: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The store writer's options (``sinks.store.StoreWriter``) from ``store``, ``None`` when off:
    what a query needs to rebuild the model goes with them into the store's ``models`` table."""
    st = cfg.store
    if st.uri is None:
        return None
    model = {"model": info["model"], "dim": int(info["dim"]), "config": model_opts["config"],
             "checkpoint": str(model_opts["checkpoint"]), "seed": int(cfg.model.seed), "precision": model_opts["precision"]}
    return {"uri": st.uri, "model": model, "batch_rows": st.batch_rows, "flush_s": st.flush_s,
            "max_pending_rows": st.max_pending_rows, "optimize_every_s": st.optimize_every_s,
            "ann_min_rows": st.ann_min_rows, "run_id": run_id}


def _lost(counts: dict[str, Any]) -> int:
    return int(counts.get("not_written", 0)) + int(counts.get("pending", 0))


def store_lost(rep: dict[str, Any]) -> str:
    """What a store report says was not written, empty when nothing: ``N row(s) not written``
    (embeddings), then the other tables' (``; also thumbnails 3, events 1``)."""
    lost = _lost(rep)
    others = {t: _lost(c) for t, c in sorted((rep.get("tables") or {}).items()) if _lost(c)}
    if not lost and not others:
        return ""
    return f"{lost} row(s) not written" + ("; also " + ", ".join(f"{t} {n}" for t, n in others.items()) if others else "")


def store_results(summaries: list[dict[str, Any]], reports: dict[str, dict[str, Any]] | None) -> None:
    """Each session's store report into its summary; a store error, or rows of any table not
    written, is the summary's ``store_error`` (exit 5)."""
    for summary in summaries:
        rep = (reports or {}).get(summary.get("session"))
        if rep is None:
            continue
        summary["store"] = rep
        lost = store_lost(rep)
        if rep.get("error") or lost:
            summary["store_error"] = f"{rep.get('error') or 'store ' + rep['uri']}; {lost or '0 row(s) not written'}"


# -- the standalone consumer: python -m pipeline store ENDPOINT --uri DIR ------------------------------

class _Consumer:
    """Messages in, rows out: the first ``start`` names the model and opens the writer; each
    embedding, and each trigger event (``evt/``, paired into ``events`` rows), becomes the row the
    in-pipeline sink makes of it. Thumbnails and captions are not on the wire: not stored here."""

    def __init__(self, uri: str, model_options: dict[str, Any], topic: str = "emb/") -> None:
        self.uri, self.model_options, self.topic = uri, model_options, topic
        self.run_id = "consumer-" + uuid.uuid4().hex[:8]
        self.writer: Any = None
        self.seen: list[str] = []
        self.models: dict[str, str] = {}  # session -> its model, from its start
        self.ended = 0

    def handle(self, msg: Any) -> None:
        from sinks.protocol import embedding_array
        from sinks.store import StoreRow, StoreWriter
        from sinks.store_tables import TriggerMark

        p = msg.payload
        if msg.kind == "trigger":
            if not self._wanted(p["session"]):
                return
            if self.writer is None or p["session"] not in self.models:
                log.warning("store consumer: %s before its session's start; not stored", msg.topic)
                return
            self.writer.add_events(p["session"], self.models[p["session"]], [TriggerMark.from_payload(p)])
        elif msg.kind == "embedding":
            if self.writer is None:
                log.warning("store consumer: %s before any session's start; not stored", msg.topic)
                return
            self.writer.add([StoreRow(p["model"], p["session"], p["stream"], p["modality"], int(p["window"]),
                                      float(p["t_start"]), float(p["t_end"]), embedding_array(msg),
                                      float(p["t_publish"]), self.run_id)])
        elif p["event"] == "start":
            if p["session"] not in self.seen:
                self.seen.append(p["session"])
            self.models[p["session"]] = p["model"]
            if self.writer is None:
                model = {"model": p["model"], "dim": int(p["dim"]), "config": p["model"], **self.model_options}
                self.writer = StoreWriter(self.uri, model, run_id=self.run_id)
        elif p["event"] == "end" and p["session"] in self.seen:
            if self.writer is not None:
                self.writer.end_session(p["session"])
            self.ended += 1

    def _wanted(self, session: str) -> bool:
        """Whether ``session``'s embeddings can match ``topic`` (its events are kept with them)."""
        mine = f"emb/{session}/"
        return mine.startswith(self.topic) or self.topic.startswith(mine)

    def close(self) -> dict[str, dict[str, Any]]:
        if self.writer is None:
            return {}
        self.writer.close()
        return {s: self.writer.report(s) for s in self.seen}


def consume(endpoint: str, uri: str, *, topic: str = "emb/", curve_client: Any = None, sessions: int | None = None,
            timeout_s: float | None = None, checkpoint: str = "auto", seed: int = 0, precision: str = "fp32",
            stop: Any = None) -> dict[str, dict[str, Any]]:
    """Store what the publisher at ``endpoint`` sends on ``topic`` (a prefix of ``emb/``), and
    the trigger events of the same sessions, into the store at ``uri``: the same rows and keys
    as the in-pipeline sink (``run_id`` aside; no thumbnails or captions, which are not on the wire).
    Stops after ``sessions`` sessions ended, after ``timeout_s`` without a message (from the
    first), or once ``stop`` (an Event) is set. ``checkpoint``, ``seed``, ``precision``: the
    run's model options, recorded for queries (the wire names only the model). Returns each
    session's store report."""
    import zmq

    from sinks.protocol import MAX_PAYLOAD_BYTES, ProtocolError, decode

    consumer = _Consumer(uri, {"checkpoint": checkpoint, "seed": seed, "precision": precision}, topic)
    session = topic[len("emb/"):].split("/")[0]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        if curve_client is not None:
            curve_client.apply(sock)
        for prefix in (topic, "ctl/" + session, "evt/" + session):  # ctl/: a start names the model; evt/: events
            sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        sock.connect(endpoint)
        last: float | None = None  # monotonic time of the last message
        while (sessions is None or consumer.ended < sessions) and not (stop is not None and stop.is_set()):
            if not sock.poll(200, zmq.POLLIN):
                if last is not None and timeout_s is not None and time.monotonic() - last >= timeout_s:
                    break
                continue
            try:
                msg = decode(sock.recv_multipart())
            except ProtocolError as exc:
                log.warning("store consumer %s: skipped malformed message: %s", endpoint, exc)
                continue
            last = time.monotonic()
            consumer.handle(msg)
    except KeyboardInterrupt:
        log.info("store consumer: interrupted; writing what was received")
    finally:
        sock.close(linger=0)
        ctx.term()
        reports = consumer.close()
    return reports


_session_count = number_type(int, "a whole number of sessions", lambda v: v >= 1, "1 or more sessions")
_timeout_seconds = number_type(float, "a number of seconds", lambda v: v > 0, "a finite number of seconds > 0")


def add_store_args(sub: Any) -> None:
    p = sub.add_parser("store", help="keep what a running publisher sends in an embedding store",
                       description="Subscribe to a bindstream publisher and write every embedding, and every "
                                   "trigger event of the same sessions, into a LanceDB store, with the rows and keys "
                                   "of the run's own store sink (docs/store.md; thumbnails and captions are not on "
                                   "the wire, so not here). "
                                   "Exit codes: 0 stored, 2 bad arguments or keys, 5 the store could not be written.")
    p.add_argument("endpoint", help="publisher endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--uri", required=True, metavar="DIR", help="the store: a folder or an object-storage URI")
    p.add_argument("--topic", default="emb/", metavar="PREFIX", help="embeddings to keep, e.g. emb/SESSION/ (default: all)")
    p.add_argument("--server-key", type=Path, metavar="FILE", help="CurveZMQ: the publisher's public key file (server.key)")
    p.add_argument("--client-key", type=Path, metavar="FILE", help="CurveZMQ: this consumer's key pair file (NAME.key_secret)")
    p.add_argument("--sessions", type=_session_count, default=None, metavar="N",
                   help="stop after N sessions ended (default: never)")
    p.add_argument("--timeout", type=_timeout_seconds, default=None, dest="timeout_s",
                   help="stop after this many seconds without a message (counted from the first message; the "
                        "first is waited for without limit)")
    p.add_argument("--checkpoint", default="auto", help="the run's model.checkpoint, recorded for queries (default auto)")
    p.add_argument("--seed", type=int, default=0, help="the run's model.seed, for checkpoint none (default 0)")
    p.set_defaults(fn=_cmd_store)


def _local_folder_problem(uri: str) -> str | None:
    """Why the local store folder ``uri`` cannot be made or written, or ``None``. Object-storage
    URIs are not checked here: their first write says."""
    if "://" in uri:
        return None
    try:
        Path(uri).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if os.access(uri, os.W_OK) else "not writable"


def _store_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the ``store`` command's arguments (checked before it connects), or ``None``."""
    from pipeline.subscribe import endpoint_problem

    port_problem = tcp_port_problem(args.endpoint, bind=False) or endpoint_problem(args.endpoint)
    if port_problem:
        return port_problem
    if args.topic and not args.topic.startswith("emb/"):
        return f"--topic {args.topic!r}: expected a prefix of embedding topics, emb/ or emb/SESSION/"
    problem = _local_folder_problem(args.uri)
    return f"--uri {args.uri}: cannot make or write the store folder: {problem}" if problem else None


def _cmd_store(args: argparse.Namespace) -> int:
    from pipeline.subscribe import curve_client_from_args

    curve, error = curve_client_from_args(args)
    error = error or _store_args_problem(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import zmq

    try:
        reports = consume(args.endpoint, args.uri, topic=args.topic, curve_client=curve, sessions=args.sessions,
                          timeout_s=args.timeout_s, checkpoint=args.checkpoint, seed=args.seed)
    except zmq.ZMQError as exc:
        print(f"error: {args.endpoint}: {exc}", file=sys.stderr)
        return 2
    failed = False
    for session, rep in sorted(reports.items()):
        lost = store_lost(rep)
        tables = ", ".join(f"{t} {c['rows']}" for t, c in sorted((rep.get("tables") or {}).items()))
        print(f"{session}: stored {rep['rows']} rows in {rep['uri']}" + (f" (and {tables})" if tables else "")
              + (f"; {lost}: {rep.get('error') or 'the store fell behind'}" if lost else ""))
        failed = failed or bool(lost or rep.get("error"))
    return 5 if failed else 0
