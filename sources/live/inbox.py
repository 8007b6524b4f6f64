"""The bounded way in of a ZeroMQ live input: a thread that owns the socket and receives every
message as soon as it arrives (:class:`ZmqReceiver`), and a byte-bounded queue between it and
the reader (:class:`Inbox`). The rule (also in ``docs/live.md``):

* Each live ZeroMQ input has a byte budget (``queue_bytes``: the stream option, else
  ``live.queue_bytes``, 64 MiB). The receiving thread drains the socket continuously, so
  libzmq's own queue stays short (its ``RCVHWM`` is the budget in ``max_bytes`` messages, at
  least 4), and puts each message in the inbox; a message that would take the inbox past the
  budget is dropped (the newest goes: tail drop) and counted as ``over_budget``. A message is
  always taken when the inbox is empty, so a message as large as ``max_bytes`` still passes.
* A message larger than ``max_bytes`` (zmq kind; imagezmq: 256 MiB) is dropped and counted as
  ``too_big``. libzmq refuses a message over twice that limit (``ZMQ_MAXMSGSIZE``) itself, before
  it is read: it closes the connection for good (libzmq does not reconnect after a protocol
  error). That is seen as a ``disconnect`` event, counted as ``disconnect`` (as is a peer that
  went away), and a socket that connected is replaced by a fresh one that connects again at
  once, so the stream goes on.
* A REP socket (imagezmq ``reqrep``) answers every request ``OK`` as soon as it is received,
  before any check, so a sender waiting for its reply never hangs while the source runs.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

import zmq

__all__ = ["Inbox", "ZmqReceiver", "DEFAULT_QUEUE_BYTES"]

DEFAULT_QUEUE_BYTES = 64 << 20


class Inbox:
    """A FIFO of items holding at most ``budget`` bytes (by the sizes given to :meth:`put`)."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"queue budget must be at least 1 byte, got {budget}")
        self.budget = int(budget)
        self.bytes = 0
        self.peak = 0
        self._q: collections.deque[tuple[Any, int]] = collections.deque()
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Any, nbytes: int) -> bool:
        """Queue ``item``; False (nothing queued) when it would take the inbox past its budget."""
        with self._ready:
            if self._q and self.bytes + nbytes > self.budget:
                return False
            self._q.append((item, nbytes))
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)
            self._ready.notify()
            return True

    def get(self, timeout_s: float) -> Any:
        """The oldest item, waiting up to ``timeout_s``; ``None`` when none came."""
        with self._ready:
            if not self._q and not self._ready.wait(timeout_s):
                return None
            if not self._q:
                return None
            item, nbytes = self._q.popleft()
            self.bytes -= nbytes
            return item


class ZmqReceiver(threading.Thread):
    """Owns a ZeroMQ socket (made by ``setup(ctx)`` in this thread) and moves every message into
    ``inbox`` as ``(frames, arrival)``; see the module docstring for the rule. ``drop(reason,
    detail)`` counts what it drops; ``reply`` (REP sockets) answers each request at once."""

    def __init__(self, setup: Callable[[zmq.Context], zmq.Socket], inbox: Inbox, now: Callable[[], float],
                 drop: Callable[[str, str], None], *, max_bytes: int, reply: bytes | None = None,
                 reconnect: str | None = None) -> None:
        super().__init__(daemon=True, name="zmq-receiver")
        self.reconnect = reconnect  # the endpoint a connecting socket connects to again after a disconnect
        self._setup, self.inbox, self._now, self._drop = setup, inbox, now, drop
        self.max_bytes, self.reply = int(max_bytes), reply
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.halt = threading.Event()

    def options(self, sock: zmq.Socket) -> None:
        """The limits every receiving socket gets (before it binds or connects)."""
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + 4096)
        sock.setsockopt(zmq.RCVHWM, max(4, self.inbox.budget // self.max_bytes))
        # Not 0: libzmq ends a connection that broke its limits (a protocol error) with the
        # socket's linger as the "delay" of the pipe's end; with 0 the pipe dies at once, and a
        # multipart message half read by recv_multipart aborts the process ("Assertion failed:
        # !_more (src/fq.cpp:80)"). With a delay the rest of the message is still read. The
        # socket is closed with linger 0 all the same (run()).
        sock.setsockopt(zmq.LINGER, 1000)

    def run(self) -> None:
        ctx = zmq.Context()
        self._sock = self._mon = None
        try:
            self._open(ctx)
        except BaseException as e:  # raised again by the reader (wait_started)
            self.error = e
        self.started.set()
        try:
            while self.error is None and self._loop():
                self._reopen(ctx)
        finally:
            self._close()
            ctx.term()

    def wait_started(self) -> None:
        self.started.wait()
        if self.error is not None:
            raise self.error

    def _open(self, ctx: zmq.Context) -> None:
        self._sock = self._setup(ctx)
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def _close(self) -> None:
        if self._mon is not None:
            self._sock.disable_monitor()
            self._mon.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._mon = None

    def _reopen(self, ctx: zmq.Context) -> None:
        """A fresh socket in place of one whose connection broke. Not ``disconnect`` and
        ``connect`` on the same socket: that ends the pipe at once, and a multipart message
        still queued in it aborts the process when read ("Assertion failed: !_more
        (src/fq.cpp)", libzmq). What the old socket holds is read first."""
        self._drain()
        self._close()
        try:
            self._open(ctx)
        except BaseException as e:  # the reader raises it when the stream next waits
            self.error = e

    def _loop(self) -> bool:
        """Receives until halted (False) or until a connecting socket's connection broke (True)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        while not self.halt.is_set():
            ready = dict(poller.poll(50))
            if self._mon in ready and self._disconnected() and self.reconnect is not None:
                return True
            if self._sock in ready:
                self._drain()
        return False

    def _disconnected(self) -> bool:
        events = 0
        while self._mon.poll(0):
            self._mon.recv_multipart()
            events += 1
            self._drop("disconnect", "connection closed (a message over twice max_bytes, which libzmq "
                                     "refuses unread, or the peer went away)")
        return events > 0

    def _drain(self) -> None:
        sock = self._sock
        while not self.halt.is_set():
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            arrival = self._now()
            if self.reply is not None:
                sock.send(self.reply)  # before any check: the sender waits on it
            size = sum(len(f) for f in frames)
            if size > self.max_bytes:
                self._drop("too_big", f"message of {size} bytes, over max_bytes {self.max_bytes}")
            elif not self.inbox.put((frames, arrival), size):
                self._drop("over_budget", f"{self.inbox.bytes} bytes queued, budget {self.inbox.budget} "
                                          "(queue_bytes): the pipeline reads slower than the sender sends")
