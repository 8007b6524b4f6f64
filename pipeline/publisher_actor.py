"""The publisher actor: the ZeroMQ publisher (protocol v1) of every session of the run, and the
store sink (``store.uri``) as a background thread of the same process.

The store writer lives here because every published record already is here: no second copy of
the vectors crosses processes, and no other actor has to be kept alive and restarted. The
publishing path only appends each batch to the writer's bounded queue; its thread batches the
rows into LanceDB (sinks/store.py), so a slow or failing disk never delays a ZeroMQ send.
Trigger events go to the writer as they are published (its ``events`` table); thumbnails and
captions are made by the session actors, which see the windows' data, and handed over with
:meth:`PublisherActor.store_rows`.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import ray

__all__ = ["PublisherActor", "PublisherRestartedError"]

log = logging.getLogger(__name__)

STORE_END_FLUSH_S = 60.0  # a session's end waits at most this long for its rows to be written


class PublisherRestartedError(RuntimeError):
    """A restarted publisher got a call for a session it has not been handed yet: the caller
    must :meth:`PublisherActor.resume` the session (with the seqs to continue from) and retry."""


@ray.remote(num_cpus=0)
class PublisherActor:
    """Owns the ZeroMQ socket. Calls from one aligner run in the order they were made.

    Restartable (``max_restarts``, see run.py): Ray re-runs ``__init__`` with the same options,
    so the socket binds the same concrete endpoint again (the driver resolves a ``*`` port
    once). A restarted publisher knows no session: calls for one raise
    :class:`PublisherRestartedError` until its aligner calls :meth:`resume`. The session-level
    calls return the session's ``next_seq`` table (topic -> next seq) so aligners can resume it.
    """

    def __init__(self, options: dict[str, Any], store: dict[str, Any] | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        from sinks.zmq_publisher import Publisher

        self.pub = Publisher(**options)
        self.store = _store_writer(store, self.pub) if store else None
        self._known: set[str] = set()  # sessions started or resumed by this incarnation
        self._models: dict[str, str] = {}  # session -> its model name (the store's events rows)
        with warnings.catch_warnings():  # Ray's own property uses a deprecated one inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._waited = False
        if self._restarted:
            log.warning("publisher restarted (pid %d), bound again to %s; sessions resume on their "
                        "aligner's next call", os.getpid(), self.pub.bound_endpoint)

    def endpoint(self) -> str:
        return self.pub.bound_endpoint

    def pid(self) -> int:
        """The process id (fault tests kill it; Ray restarts it)."""
        return os.getpid()

    def wait_for_subscribers(self) -> None:
        self.pub.wait_for_subscribers()

    def start_session(self, session: str, streams: dict[str, str], model: str, dim: int) -> dict[str, int]:
        self.pub.start_session(session, streams, model, dim)
        self._known.add(session)
        self._models[session] = model
        return self.pub.next_seqs(session)

    def resume(self, session: str, streams: dict[str, str], model: str, dim: int,
               next_seq: dict[str, int]) -> dict[str, int]:
        """Take ``session`` over after a restart, continuing ``seq`` at ``next_seq`` (no ``start``
        is re-sent). In replay mode the first resume of an incarnation waits (up to
        ``wait_timeout_s``) for the configured subscribers to reconnect, so what is published
        from here on is not sent into the void."""
        self.pub.resume_session(session, streams, model, dim, next_seq)
        self._known.add(session)
        self._models[session] = model
        if self.pub.mode == "replay" and not self._waited:
            self._waited = True
            try:
                self.pub.wait_for_subscribers()
            except TimeoutError as exc:
                log.warning("session '%s': %s; publishing anyway", session, exc)
        log.info("session '%s': resumed on %s at %s", session, self.pub.bound_endpoint, next_seq)
        return self.pub.next_seqs(session)

    def _require(self, session: str) -> None:
        if session not in self._known and self._restarted:
            raise PublisherRestartedError(f"publisher restarted: session '{session}' must be resumed first")

    def publish(self, records: list[Any]) -> dict[str, int]:
        """Publish ``records`` (all of one session); returns that session's ``next_seq`` table."""
        sessions = {r.session for r in records}
        for s in sessions:
            self._require(s)
        self.pub.publish(records)
        return {t: n for s in sessions for t, n in self.pub.next_seqs(s).items()}

    def publish_events(self, session: str, events: list[Any]) -> dict[str, int]:
        """Publish trigger events of ``session`` (:meth:`sinks.base.SinkBase.publish_events`)."""
        self._require(session)
        self.pub.publish_events(session, events)
        if self.store is not None:
            self.store.add_events(session, self._models.get(session, ""), events)
        return self.pub.next_seqs(session)

    def store_rows(self, rows: list[Any]) -> None:
        """Queue rows of the store's other tables (thumbnails, captions) made by a session actor;
        without a store, nothing. Returns at once."""
        if self.store is not None:
            self.store.add(rows)

    def heartbeat(self, session: str, counters: dict[str, Any]) -> dict[str, int]:
        self._require(session)
        self.pub.heartbeat(session, counters)
        return self.pub.next_seqs(session)

    def end_session(self, session: str, **fields: Any) -> dict[str, int]:
        """Send ``end``; with a store, once the session's rows are written (or failed): its
        ``store`` field says how many (docs/protocol.md)."""
        self._require(session)
        if self.store is not None:
            self.store.end_session(session)
            self.store.flush(STORE_END_FLUSH_S)
            fields["store"] = self.store.report(session)
        self.pub.end_session(session, **fields)
        return self.pub.next_seqs(session)

    def stats(self) -> dict[str, Any]:
        """:meth:`Publisher.stats` plus this incarnation's ``pid`` and whether it is a ``restarted`` one."""
        return {**self.pub.stats(), "pid": os.getpid(), "restarted": self._restarted}

    def close(self) -> dict[str, Any]:
        """Close the socket, then the store (what is queued is written first); returns
        ``{"store": {session: report}}`` with a store, else ``{}``."""
        self.pub.close()
        if self.store is None:
            return {}
        self.store.close(STORE_END_FLUSH_S)
        return {"store": {s: self.store.report(s) for s in sorted(self._known)}}


def _store_writer(store: dict[str, Any], pub: Any) -> Any:
    """The store sink (a background thread of this actor, fed by every published batch)."""
    from sinks.store import StoreWriter

    writer = StoreWriter(**store)
    pub.on_publish = writer.add_published
    return writer
