"""``python -m pipeline subscribe``: print what a bindstream publisher sends, one line per message.

Every message is validated with :func:`sinks.protocol.decode` (bounded unpacking: a hostile
publisher cannot make us allocate more than the protocol limit). Malformed messages are logged
and skipped. A ``seq`` gap on a topic (a reconnect, or live-mode drops) is logged as a warning
naming the topic and how many messages were missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq

from pipeline.cli_types import number_type
from sinks.keys import CurveClientConfig
from sinks.protocol import MAX_PAYLOAD_BYTES, Message, ProtocolError, decode, embedding_array

__all__ = ["subscribe", "format_message", "add_subscribe_args", "run_subscribe", "curve_client_from_args",
           "endpoint_problem"]

log = logging.getLogger(__name__)


class _GapTracker:
    """Per-topic expected next ``seq``. The first message of a topic sets the baseline: a
    subscriber that joins mid-session has not *missed* the earlier ones."""

    def __init__(self) -> None:
        self._expected: dict[str, int] = {}
        self.missed: dict[str, int] = {}

    def see(self, topic: str, seq: int | None) -> int:
        """Record ``seq`` on ``topic``; returns how many messages were skipped (0 if none)."""
        if seq is None:
            return 0
        expected = self._expected.get(topic)
        self._expected[topic] = seq + 1
        if expected is None or seq == expected:
            return 0
        if seq < expected:
            # The publisher restarted without resume_seqs: numbering went backwards.
            log.warning("topic %s: seq went back from %d to %d (publisher restarted?)", topic, expected - 1, seq)
            return 0
        gap = seq - expected
        self.missed[topic] = self.missed.get(topic, 0) + gap
        log.warning("topic %s: seq gap, expected %d got %d: %d message(s) missed", topic, expected, seq, gap)
        return gap


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; latency_s is NaN when the ingest time is unknown
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def format_message(msg: Message, *, json_out: bool = False) -> str:
    """One output line for a message: a human summary, or JSON with every payload field plus
    ``topic`` (the embedding as a list of floats)."""
    if json_out:
        doc = {"topic": msg.topic, **msg.payload}
        if msg.kind == "embedding":
            doc["embedding"] = embedding_array(msg).astype(np.float64).tolist()
        return json.dumps(_jsonable(doc), separators=(",", ":"))
    p = msg.payload
    if msg.kind == "embedding":
        vec = embedding_array(msg)
        latency = p["latency_s"]
        lat = f"{latency * 1000:.1f}ms" if math.isfinite(latency) else "?"
        return (f"{msg.topic} seq={p['seq']} window={p['window']} stream={p['stream']} "
                f"t=[{p['t_start']:.3f},{p['t_end']:.3f}] dim={p['dim']} {p['dtype']} "
                f"norm={float(np.linalg.norm(vec.astype(np.float64))):.3f} latency={lat}")
    if msg.kind == "trigger":
        reason = f" ({p['reason']})" if p.get("reason") else ""
        return (f"{msg.topic} seq={p['seq']} {p['event']}{reason} trigger={p['trigger']} stream={p['stream']} "
                f"{p['modality']} window={p['window']} t=[{p['t_start']:.3f},{p['t_end']:.3f}] score={p['score']:.3f}")
    fields = {k: v for k, v in p.items() if k not in ("v", "session", "event", "seq", "t_publish")}
    rest = " ".join(f"{k}={json.dumps(_jsonable(v), separators=(',', ':'))}" for k, v in fields.items())
    return f"{msg.topic} seq={p.get('seq', '?')} {p['event']} {rest}".rstrip()


def subscribe(
    endpoint: str,
    *,
    topic: str = "",
    json_out: bool = False,
    curve_client: CurveClientConfig | None = None,
    count: int | None = None,
    timeout_s: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Connect to a publisher and write one line per message to ``out``.

    ``topic`` is a ZeroMQ prefix filter (``emb/S/`` for one session's embeddings; mind the
    trailing slash, ``emb/S`` also matches ``emb/S2/...``). Stops after ``count`` valid
    messages, or when nothing arrived for ``timeout_s`` seconds after the first message (the
    first is waited for without limit, so a publisher still starting is not missed; ``None``:
    runs until interrupted). At exit it logs the messages received per topic and any missed
    (seq gaps). Returns the number of messages printed. ``out`` defaults to ``sys.stdout``.
    """
    out = sys.stdout if out is None else out
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    printed = 0
    gaps = _GapTracker()
    received: dict[str, int] = {}
    try:
        # Frames larger than the protocol allows are refused by libzmq before allocation.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        if curve_client is not None:
            curve_client.apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(endpoint)
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000))
        while count is None or printed < count:
            if not sock.poll(timeout_ms if printed else -1, zmq.POLLIN):
                log.info("subscriber %s: nothing received for %s s, stopping", endpoint, timeout_s)
                break
            frames = sock.recv_multipart()
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                log.warning("subscriber %s: skipped malformed message: %s", endpoint, exc)
                continue
            gaps.see(msg.topic, msg.seq)
            received[msg.topic] = received.get(msg.topic, 0) + 1
            out.write(format_message(msg, json_out=json_out) + "\n")
            out.flush()
            printed += 1
    finally:
        sock.close(linger=0)
        ctx.term()
    _log_summary(endpoint, received, gaps.missed)
    return printed


def _log_summary(endpoint: str, received: dict[str, int], missed: dict[str, int]) -> None:
    per_topic = ", ".join(f"{t} {n}" for t, n in sorted(received.items())) or "nothing"
    log.info("subscriber %s: received %s", endpoint, per_topic)
    if missed:
        log.warning("subscriber %s: missed messages per topic (seq gaps): %s", endpoint,
                    ", ".join(f"{t} {n}" for t, n in sorted(missed.items())))


def add_subscribe_args(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``subscribe`` sub-command to a CLI's sub-parsers (sets ``fn=run_subscribe``)."""
    p = subparsers.add_parser(
        "subscribe",
        help="print the messages of a bindstream publisher",
        description="Connect to a bindstream publisher and print one line per message. Exit codes: 0 stopped "
                    "(--count reached, --timeout passed, or Ctrl-C), 2 a bad endpoint (malformed, a host that does not "
                    "resolve, an ipc:// path whose folder does not exist), key file, --count or --timeout.",
    )
    p.add_argument("endpoint", help="publisher endpoint, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/bs.sock")
    p.add_argument("--topic", default="", metavar="PREFIX",
                   help="topic prefix filter, e.g. 'emb/SESSION/', 'ctl/' or 'evt/' (trigger events; default: everything)")
    p.add_argument("--json", action="store_true", dest="json_out",
                   help="print JSON lines (embedding as a list of floats)")
    p.add_argument("--server-key", type=Path, metavar="FILE",
                   help="CurveZMQ: the publisher's public key file (server.key)")
    p.add_argument("--client-key", type=Path, metavar="FILE",
                   help="CurveZMQ: this subscriber's key pair file (NAME.key_secret)")
    p.add_argument("--count", type=_positive_count, default=None, help="stop after this many messages (1 or more)")
    p.add_argument("--timeout", type=_timeout_seconds, default=None, dest="timeout_s", metavar="S",
                   help="stop after S seconds without a message (a finite number, 0 or more; counted from the "
                        "first message, which is waited for without limit)")
    p.set_defaults(fn=run_subscribe)
    return p


_positive_count = number_type(int, "a whole number of messages", lambda v: v >= 1, "1 or more messages")
_timeout_seconds = number_type(float, "a number of seconds", lambda v: v >= 0, "a finite number of seconds, 0 or more",
                               " (leave --timeout out to wait without limit)")


def endpoint_problem(endpoint: str) -> str | None:
    """Why connecting to ``endpoint`` would wait forever, or ``None``: a ``tcp://`` host that does
    not resolve, an ``ipc://`` path whose folder does not exist. ZeroMQ's connect never fails on
    these; it retries in the background, so a subscriber would wait in silence."""
    if endpoint.startswith("tcp://"):
        # tcp://[SOURCE;]HOST:PORT; an IPv6 host is written in brackets.
        host, _, port = endpoint[len("tcp://"):].rpartition(";")[2].rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            why = exc.strerror if isinstance(exc, socket.gaierror) else exc
            return f"{endpoint}: host {host!r} does not resolve ({why}); check the host name, or give the publisher's IP address"
        return None
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):  # '@': Linux abstract namespace
        folder = Path(endpoint[len("ipc://"):]).parent
        if not folder.is_dir():
            return (f"{endpoint}: folder {folder} does not exist, so no publisher can bind there; "
                    "give the path the publisher binds (its publish.endpoint)")
    return None


def _key_file_problem(args: argparse.Namespace) -> str | None:
    for flag, path in (("--server-key", args.server_key), ("--client-key", args.client_key)):
        if path is not None and path.is_dir():
            return (f"{flag} {path} is a folder, expected a file (" +
                    ("the publisher's public key, server.key" if flag == "--server-key" else
                     "this subscriber's key pair, NAME.key_secret") + ", as `keys` writes them)")
    return None


def curve_client_from_args(args: argparse.Namespace) -> tuple[CurveClientConfig | None, str | None]:
    """The CurveZMQ client keys of ``--server-key``/``--client-key`` (both or neither), or the
    error to print: ``(keys or None, None)`` or ``(None, message)``."""
    if (args.server_key is None) != (args.client_key is None):
        return None, "--server-key and --client-key go together (CurveZMQ needs both)"
    if args.server_key is None:
        return None, None
    folder = _key_file_problem(args)
    if folder is not None:
        return None, folder
    try:
        return CurveClientConfig.from_files(args.server_key, args.client_key), None
    except (OSError, ValueError) as exc:
        return None, str(exc)


def run_subscribe(args: argparse.Namespace) -> int:
    """Run ``subscribe`` from parsed arguments. Returns the exit code."""
    from pipeline.config import tcp_port_problem

    curve, error = curve_client_from_args(args)
    error = error or tcp_port_problem(args.endpoint, bind=False) or endpoint_problem(args.endpoint)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        subscribe(args.endpoint, topic=args.topic, json_out=args.json_out, curve_client=curve,
                  count=args.count, timeout_s=args.timeout_s)
    except KeyboardInterrupt:
        return 0
    except zmq.ZMQError as exc:
        print(f"error: {args.endpoint}: {exc}", file=sys.stderr)
        return 2
    return 0
