"""The ZeroMQ publisher: protocol v1 messages on an XPUB socket.

Two delivery rules (docs/protocol.md, "Delivery"):

* ``replay``: lossless. ``XPUB_NODROP`` makes a send block while any matching subscriber's
  queue is at the high-water mark, so a slow subscriber slows the replay down instead of
  losing messages. ``wait_for_subscribers`` holds the first message back until N
  subscriptions arrived, so nothing is published into the void.
* ``live``: never blocks. Sends are non-blocking; when a matching subscriber's queue is full
  libzmq refuses the message (``XPUB_NODROP`` + ``NOBLOCK`` -> ``zmq.Again``) and we count an
  ``hwm`` drop on that topic. NODROP is all-or-none (libzmq's XPUB sends a message to all
  matching pipes or to none), so the refused message is then sent once more with NODROP off:
  every subscriber with room gets it and only the full ones miss it, so one stalled subscriber
  costs the others nothing. The ``seq`` it consumed leaves a gap the stalled subscriber can
  see. (Plain XPUB without NODROP would drop silently per subscriber and the publisher could
  not count anything; the NODROP attempt first is what tells us a queue was full.)

XPUB rather than PUB so the publisher sees subscriptions (``XPUB_VERBOSER``: every subscribe
and unsubscribe, duplicates included), which is how it counts subscribers, and how it greets a
late one: a subscription that matches a running session's ``ctl/<session>`` makes the publisher
send that session's ``start`` again, marked ``repeat: true`` and without ``seq`` (docs/protocol.md,
"Late subscribers"), before its next message. Every subscriber of the topic gets the copy (PUB/SUB
cannot address one); having no ``seq``, it moves no subscriber's gap tracking.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator

from sinks.keys import CurveServerConfig
from sinks.protocol import DEFAULT_ENDPOINT, DEFAULT_MODEL, ctl_topic, encode_control
from sinks.base import SinkBase

__all__ = ["Publisher", "PUBLISH_MODES"]

log = logging.getLogger(__name__)

PUBLISH_MODES = ("replay", "live")

# Subscribers only send subscriptions and handshakes (CURVE INITIATE is ~300 bytes); anything
# larger is hostile or broken and libzmq drops the connection.
_MAX_INBOUND_BYTES = 64 * 1024


class _AllowList:
    """ZAP credentials provider: accept exactly the configured client public keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            log.warning("CurveZMQ: refused subscriber with unknown public key %s", key.decode("ascii", "replace"))
        return allowed


class Publisher(SinkBase):
    """Publishes sessions and embeddings on a bound ZeroMQ XPUB socket.

    Plain Python: use it in-process or wrap it in a Ray actor (one thread per instance;
    ZeroMQ sockets are not thread safe). ``endpoint`` may use port ``*``
    (``tcp://127.0.0.1:*``); :attr:`bound_endpoint` then tells the real one.

    ``hwm`` is the per-subscriber queue length (messages) before replay blocks or live drops;
    ``sndbuf`` (bytes, 0 = OS default) the OS send buffer of each subscriber connection, which
    holds messages on top of it.
    ``send_timeout_s`` bounds how long a replay send may block (``None``: forever) and
    ``control_timeout_s`` how long live mode retries a control message (start/heartbeat/end are
    rare and matter) before counting it dropped (once per stall: until a message reaches every
    subscriber again, control messages do not wait). ``linger_s`` is how long :meth:`close` keeps
    flushing queued messages.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        mode: str = "replay",
        wait_for_subscribers: int = 0,
        wait_timeout_s: float | None = None,
        hwm: int = 1000,
        sndbuf: int = 0,
        curve: CurveServerConfig | None = None,
        model_name: str = DEFAULT_MODEL,
        resume_seqs: Mapping[str, int] | None = None,
        send_timeout_s: float | None = None,
        control_timeout_s: float = 1.0,
        linger_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in PUBLISH_MODES:
            raise ValueError(f"publisher mode {mode!r} unknown, expected one of {PUBLISH_MODES}")
        if isinstance(hwm, bool) or not isinstance(hwm, int) or hwm < 1:
            raise ValueError(f"publisher hwm must be an integer >= 1, got {hwm!r}")
        if isinstance(wait_for_subscribers, bool) or not isinstance(wait_for_subscribers, int) or wait_for_subscribers < 0:
            raise ValueError(f"wait_for_subscribers must be an integer >= 0, got {wait_for_subscribers!r}")
        super().__init__(model_name=model_name, resume_seqs=resume_seqs, clock=clock)
        self.mode = mode
        self._min_subscribers = wait_for_subscribers
        self._wait_timeout_s = wait_timeout_s
        self._control_timeout_s = control_timeout_s
        self._linger_ms = max(0, int(linger_s * 1000))
        self._subscriptions = 0
        self._announced: set[str] = set()  # sessions whose start went out (or a predecessor's, on resume)
        self._greet: set[str] = set()  # announced sessions a subscription since the last send matched
        self._greeting = False
        # Live: a control message waited control_timeout_s for a full queue in vain. Until a
        # message goes through to every subscriber again, later control messages do not wait
        # (a stalled subscriber would otherwise cost the run control_timeout_s per heartbeat).
        self._stalled = False
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._sock = self._ctx.socket(zmq.XPUB)
        try:
            self._configure(curve, hwm, send_timeout_s, sndbuf)
            self._sock.bind(endpoint)
        except Exception as exc:
            self._teardown(linger_ms=0)
            if isinstance(exc, zmq.ZMQError):
                raise OSError(f"publisher: cannot bind {endpoint!r}: {exc}") from exc
            raise
        self.bound_endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if curve is None and endpoint.startswith("tcp://") and not endpoint.startswith(("tcp://127.", "tcp://localhost", "tcp://[::1]")):
            log.warning("publisher %s is reachable beyond this host without CurveZMQ: anyone can "
                        "subscribe to the embeddings", self.bound_endpoint)
        log.info("publisher bound to %s (mode=%s, hwm=%d, curve=%s)", self.bound_endpoint, mode, hwm, curve is not None)

    def _configure(self, curve: CurveServerConfig | None, hwm: int, send_timeout_s: float | None,
                   sndbuf: int = 0) -> None:
        sock = self._sock
        sock.setsockopt(zmq.SNDHWM, hwm)
        if sndbuf > 0:
            # The OS buffers of each connection hold messages beyond the hwm (up to MiBs with
            # TCP autotuning): a small one makes live loss bounded by hwm and noticed sooner.
            sock.setsockopt(zmq.SNDBUF, sndbuf)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_INBOUND_BYTES)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        if send_timeout_s is not None and self.mode == "replay":
            sock.setsockopt(zmq.SNDTIMEO, max(0, int(send_timeout_s * 1000)))
        if curve is not None:
            if not zmq.has("curve"):
                raise RuntimeError("publisher: CurveZMQ requested but this libzmq lacks CURVE support")
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".auth"))
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(curve.allowed_clients))
            sock.curve_secretkey = curve.secret_key
            sock.curve_publickey = curve.public_key
            sock.curve_server = True

    # -- subscribers ---------------------------------------------------------------------------

    def _drain_subscriptions(self) -> None:
        """Read pending (un)subscription messages: ``b"\\x01" + prefix`` / ``b"\\x00" + prefix``."""
        if self._sock.closed:
            return
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._subscriptions += 1
                prefix = msg[1:].decode("utf-8", "replace")
                self._greet.update(s for s in self._announced if ctl_topic(s).startswith(prefix))
                log.debug("publisher %s: subscription %r", self.bound_endpoint, msg[1:])
            elif msg[:1] == b"\x00":
                self._subscriptions = max(0, self._subscriptions - 1)

    @property
    def subscriptions(self) -> int:
        """Subscriptions currently held by connected subscribers (a subscriber with two topic
        prefixes counts twice)."""
        self._drain_subscriptions()
        return self._subscriptions

    def wait_for_subscribers(self, n: int | None = None, timeout_s: float | None = None) -> int:
        """Block until at least ``n`` subscriptions arrived (default: the constructor's
        ``wait_for_subscribers``); returns how many there are. Raises ``TimeoutError`` after
        ``timeout_s`` (default: the constructor's ``wait_timeout_s``; ``None`` waits forever)."""
        n = self._min_subscribers if n is None else n
        timeout_s = self._wait_timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._drain_subscriptions()
        if self._subscriptions < n:
            log.info("publisher %s: waiting for %d subscriber(s)", self.bound_endpoint, n)
        while self._subscriptions < n:
            remaining_ms = -1 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if deadline is not None and remaining_ms == 0:
                raise TimeoutError(
                    f"publisher {self.bound_endpoint}: {self._subscriptions} of {n} subscriber(s) "
                    f"subscribed within {timeout_s} s"
                )
            if self._sock.poll(remaining_ms, zmq.POLLIN):
                self._drain_subscriptions()
        return self._subscriptions

    # -- transport -----------------------------------------------------------------------------

    def start_session(self, session: str, streams: Mapping[str, str], model: str | None = None,
                      dim: int = 1024) -> None:
        """Wait for the configured subscribers (see :meth:`wait_for_subscribers`), then announce
        the session. See :meth:`SinkBase.start_session`."""
        if self._min_subscribers:
            self.wait_for_subscribers()
        self._announced.discard(session)  # a name used again: no repeat before its new start
        super().start_session(session, streams, model=model, dim=dim)
        self._announced.add(session)

    def resume_session(self, session: str, streams: Mapping[str, str], model: str | None = None, dim: int = 1024,
                       next_seq: Mapping[str, int] | None = None) -> None:
        """See :meth:`SinkBase.resume_session`; the session's ``start`` went out before (a late
        subscriber gets it repeated)."""
        super().resume_session(session, streams, model=model, dim=dim, next_seq=next_seq)
        self._announced.add(session)

    def _repeat_starts(self) -> None:
        """Send each running session's ``start`` once more (``repeat: true``, no ``seq``) when a
        subscription since the last send matches its ``ctl/<session>`` topic."""
        if not self._greet or self._greeting:
            return
        sessions, self._greet = sorted(self._greet), set()
        self._greeting = True
        try:
            for session in sessions:
                sess = self._sessions.get(session)
                if sess is None or sess.ended:
                    continue
                frames = encode_control(session, "start", streams=dict(sess.streams), model=sess.model, dim=sess.dim,
                                        t_publish=self._clock(), repeat=True)
                self._send(*frames, control=True)
        finally:
            self._greeting = False

    def _send(self, topic: bytes, payload: bytes, *, control: bool) -> bool:
        self._drain_subscriptions()  # keeps the subscription count current at no real cost
        self._repeat_starts()
        if self.mode == "replay":
            try:
                self._sock.send_multipart([topic, payload], copy=False)
            except zmq.Again:
                raise TimeoutError(
                    f"publisher {self.bound_endpoint}: replay send on {topic.decode()!r} blocked past "
                    f"send_timeout_s; a subscriber stopped reading"
                ) from None
            return True
        wait_s = self._control_timeout_s if control and not self._stalled else 0.0
        deadline = time.monotonic() + wait_s
        while True:
            try:
                # NODROP + NOBLOCK: libzmq refuses the whole message (both frames) at the HWM.
                self._sock.send_multipart([topic, payload], flags=zmq.NOBLOCK, copy=False)
                self._stalled = False
                return True
            except zmq.Again:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.001)
        if wait_s > 0:
            self._stalled = True
        self._send_lossy(topic, payload)
        return False  # counted as an hwm drop: at least one subscriber misses this message

    def _send_lossy(self, topic: bytes, payload: bytes) -> None:
        """Send to every matching subscriber whose queue has room; the full ones miss it."""
        self._sock.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            self._sock.send_multipart([topic, payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # not expected without NODROP; the drop is counted either way
            pass
        finally:
            self._sock.setsockopt(zmq.XPUB_NODROP, 1)

    def stats(self) -> dict[str, Any]:
        """:meth:`SinkBase.stats` plus ``endpoint``, ``mode`` and ``subscriptions``; ``dropped``
        counts ``hwm`` drops per topic (live mode)."""
        out = super().stats()
        out.update(endpoint=self.bound_endpoint, mode=self.mode, subscriptions=self.subscriptions)
        return out

    def close(self) -> None:
        """Flush queued messages for up to ``linger_s``, then release the socket. Idempotent."""
        self._teardown(self._linger_ms)

    def _teardown(self, linger_ms: int) -> None:
        if self._sock is not None and not self._sock.closed:
            self._sock.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.term()  # returns once the linger period flushed or expired
