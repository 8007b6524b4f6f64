"""Session bookkeeping shared by every sink.

:class:`SinkBase` owns everything about a session's messages except the transport: it checks
records against the session's ``start`` message, assigns ``seq`` per topic, stamps
``t_publish``/``latency_s`` and encodes with :mod:`sinks.protocol`. A transport subclass
implements only ``_send`` (:class:`sinks.memory.ListSink`, :class:`sinks.zmq_publisher.Publisher`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from sinks.protocol import (
    DEFAULT_MODEL,
    EmbeddingRecord,
    ctl_topic,
    emb_topic,
    encode_control,
    encode_embedding,
    encode_event,
    evt_topic,
)

__all__ = ["SinkBase"]

log = logging.getLogger(__name__)


@dataclass
class _Session:
    streams: dict[str, str]
    model: str
    dim: int
    published: Counter = field(default_factory=Counter)  # modality -> embeddings handed to the transport
    last_control: float = 0.0  # clock() of the last control message, for maybe_heartbeat
    ended: bool = False


def _of_session(session: str, topic: str) -> bool:
    """Whether ``topic`` is ``ctl/<session>``, ``emb/<session>/<modality>`` or ``evt/<session>/<trigger>``."""
    if topic == ctl_topic(session):
        return True
    for prefix in (f"emb/{session}/", f"evt/{session}/"):
        if topic.startswith(prefix) and len(topic) > len(prefix) and "/" not in topic[len(prefix):]:
            return True
    return False


class SinkBase:
    """Turns sessions and :class:`EmbeddingRecord` batches into protocol v1 messages.

    ``resume_seqs`` (topic -> next seq) lets a restarted publisher continue numbering where the
    previous one stopped, so subscribers never see a seq reused; :meth:`stats` reports the
    current ``next_seq`` table for exactly that purpose. ``clock`` is injectable for tests.
    Not thread safe: use one sink from one thread (a Ray actor is).
    """

    def __init__(
        self,
        *,
        model_name: str = DEFAULT_MODEL,
        resume_seqs: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._model_name = model_name
        self._clock = clock
        self._next_seq: dict[str, int] = {}
        for topic, seq in (resume_seqs or {}).items():
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise ValueError(f"resume_seqs[{topic!r}] must be an integer >= 0, got {seq!r}")
            self._next_seq[str(topic)] = seq
        self._sessions: dict[str, _Session] = {}
        self._dropped: Counter = Counter()  # topic -> messages the transport could not send
        # Called with every published batch as (record, model, t_publish) triples, before the
        # transport sends it (the store sink queues them here); it must return at once.
        self.on_publish: Callable[[list[tuple[EmbeddingRecord, str, float]]], None] | None = None

    # -- transport hooks ---------------------------------------------------------------------

    def _send(self, topic: bytes, payload: bytes, *, control: bool) -> bool:
        """Send one message; return False when it was dropped (counted by the caller)."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------

    def start_session(
        self,
        session: str,
        streams: Mapping[str, str],
        model: str | None = None,
        dim: int = 1024,
    ) -> None:
        """Announce a session (``start`` on ``ctl/<session>``): its streams (name -> modality),
        model name and embedding dimension. Records of the session must match ``dim``."""
        if session in self._sessions and not self._sessions[session].ended:
            raise ValueError(f"session {session!r} already started and not ended")
        streams = {str(k): str(v) for k, v in dict(streams).items()}
        model = model or self._model_name
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"session {session!r}: dim must be a positive integer, got {dim!r}")
        dim = int(dim)
        ctl_topic(session)  # validates the session name before anything is sent
        self._sessions[session] = _Session(streams=streams, model=model, dim=dim)
        self._control(session, "start", streams=streams, model=model, dim=dim)

    def publish(self, records: Iterable[EmbeddingRecord]) -> int:
        """Publish a batch of embeddings; returns how many were sent (the rest were dropped).

        Every record is validated and encoded before the first is sent, so a bad record never
        leaves a batch half published.
        """
        now = self._clock()
        encoded: list[tuple[bytes, bytes, str, str]] = []
        claimed: dict[str, int] = {}  # topic -> next seq; committed only once the whole batch is valid
        records = list(records)
        for rec in records:
            sess = self._open_session(rec.session)
            known = sess.streams.get(rec.stream)
            if known is not None and known != rec.modality:
                raise ValueError(
                    f"session {rec.session!r}: stream {rec.stream!r} was announced as {known!r}, "
                    f"record says {rec.modality!r}"
                )
            size = getattr(rec.embedding, "size", None)
            if size != sess.dim:
                raise ValueError(
                    f"session {rec.session!r}: stream {rec.stream!r} window {rec.window}: embedding has "
                    f"{size} values, expected dim {sess.dim} from start_session"
                )
            topic = emb_topic(rec.session, rec.modality)
            seq = claimed.get(topic, self._next_seq.get(topic, 0))
            claimed[topic] = seq + 1
            # Latency is the user-visible delay: last sample in -> embedding out.
            latency = now - rec.t_ingest if rec.t_ingest > 0 else math.nan
            frames = encode_embedding(
                session=rec.session,
                stream=rec.stream,
                modality=rec.modality,
                seq=seq,
                window=rec.window,
                t_start=rec.t_start,
                t_end=rec.t_end,
                model=sess.model,
                embedding=rec.embedding,
                t_publish=now,
                latency_s=latency,
            )
            encoded.append((frames[0], frames[1], rec.session, rec.modality))
        self._next_seq.update(claimed)
        if self.on_publish is not None:
            self.on_publish([(rec, self._sessions[rec.session].model, now) for rec in records])
        sent = 0
        for topic_b, payload, session, modality in encoded:
            if self._send(topic_b, payload, control=False):
                self._sessions[session].published[modality] += 1
                sent += 1
            else:
                self._dropped[topic_b.decode()] += 1
        return sent

    def publish_events(self, session: str, events: Iterable[Any]) -> int:
        """Publish trigger events of ``session`` on ``evt/<session>/<trigger>`` (docs/protocol.md);
        each has ``trigger``, ``kind`` (``start``/``end``), ``stream``, ``modality``, ``window``,
        ``t_start``, ``t_end``, ``score``, ``reason`` (``end``) and optionally ``score_kind``. Seqs count per topic, as for
        embeddings; every event is encoded before the first is sent. Returns how many were sent."""
        self._open_session(session)
        now = self._clock()
        encoded: list[tuple[bytes, bytes]] = []
        claimed: dict[str, int] = {}
        for e in events:
            topic = evt_topic(session, e.trigger)
            seq = claimed.get(topic, self._next_seq.get(topic, 0))
            claimed[topic] = seq + 1
            extra = {"reason": e.reason} if e.reason else {}
            if getattr(e, "score_kind", None):
                extra["score_kind"] = e.score_kind
            encoded.append(encode_event(session=session, trigger=e.trigger, event=e.kind, seq=seq, stream=e.stream,
                                        modality=e.modality, window=e.window, t_start=e.t_start, t_end=e.t_end,
                                        score=e.score, t_publish=now, **extra))
        self._next_seq.update(claimed)
        sent = 0
        for topic_b, payload in encoded:
            if self._send(topic_b, payload, control=True):
                sent += 1
            else:
                self._dropped[topic_b.decode()] += 1
        return sent

    def heartbeat(self, session: str, counters: Mapping[str, Any] | None = None, **extra: Any) -> None:
        """Send a ``heartbeat`` with the caller's ``counters`` plus this sink's own ``published``
        (per modality) and ``dropped`` (per reason) so far. ``extra`` may carry ``missing``."""
        sess = self._open_session(session)
        self._control(
            session,
            "heartbeat",
            counters=dict(counters or {}),
            published=dict(sess.published),
            dropped=self._own_drops(session),
            **extra,
        )

    def maybe_heartbeat(
        self, session: str, counters: Mapping[str, Any] | None = None, *, every_s: float = 2.0, **extra: Any
    ) -> bool:
        """Send a heartbeat if none (nor any other control message) went out in the last
        ``every_s`` seconds; call it as often as convenient. Returns whether one was sent."""
        if self._clock() - self._open_session(session).last_control < every_s:
            return False
        self.heartbeat(session, counters, **extra)
        return True

    def end_session(
        self,
        session: str,
        counts: Mapping[str, int] | None = None,
        windows: int = 0,
        dropped: Mapping[str, int] | None = None,
        **extra: Any,
    ) -> None:
        """Send ``end``, the last message of the session.

        ``counts`` defaults to the embeddings this sink sent per modality; ``dropped`` (per
        reason, e.g. ``late``) is merged with this sink's own ``hwm`` drops.
        """
        sess = self._open_session(session)
        merged = Counter({str(k): int(v) for k, v in (dropped or {}).items()})
        merged.update(self._own_drops(session))
        self._control(
            session,
            "end",
            counts=dict(counts) if counts is not None else dict(sess.published),
            windows=windows,
            dropped=dict(merged),
            **extra,
        )
        sess.ended = True  # even if the end message itself was dropped (counted), the session is over

    def resume_session(
        self,
        session: str,
        streams: Mapping[str, str],
        model: str | None = None,
        dim: int = 1024,
        next_seq: Mapping[str, int] | None = None,
    ) -> None:
        """Take over ``session`` from a previous publisher (after a restart) without sending
        ``start`` again: its records are accepted from now on, and ``seq`` continues at
        ``next_seq`` (topic -> next seq, topics of this session only). Counters only move
        forward, so a seq is never reused; calling it twice is harmless."""
        for topic, seq in (next_seq or {}).items():
            if not _of_session(session, str(topic)):
                raise ValueError(f"session {session!r}: resume topic {topic!r} is not one of this session's")
            if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
                raise ValueError(f"session {session!r}: resume seq for {topic!r} must be an integer >= 0, got {seq!r}")
            self._next_seq[str(topic)] = max(self._next_seq.get(str(topic), 0), int(seq))
        if session not in self._sessions or self._sessions[session].ended:
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
                raise ValueError(f"session {session!r}: dim must be a positive integer, got {dim!r}")
            self._sessions[session] = _Session(streams={str(k): str(v) for k, v in dict(streams).items()},
                                               model=model or self._model_name, dim=int(dim))

    def next_seqs(self, session: str) -> dict[str, int]:
        """The ``next_seq`` entries of ``session``'s topics (``ctl/<session>``, ``emb/<session>/*``)."""
        return {t: s for t, s in self._next_seq.items() if _of_session(session, t)}

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and for resuming: ``next_seq`` (topic -> next seq, pass it
        as ``resume_seqs`` to a replacement), ``published`` (session -> modality -> n),
        ``dropped`` (topic -> n)."""
        return {
            "next_seq": dict(self._next_seq),
            "published": {s: dict(v.published) for s, v in self._sessions.items()},
            "dropped": dict(self._dropped),
        }

    def close(self) -> None:
        """Release the transport; the base class holds nothing."""

    def __enter__(self) -> "SinkBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------

    def _open_session(self, session: str) -> _Session:
        sess = self._sessions.get(session)
        if sess is None:
            raise ValueError(f"session {session!r} not started: call start_session first")
        if sess.ended:
            raise ValueError(f"session {session!r} already ended")
        return sess

    def _own_drops(self, session: str) -> dict[str, int]:
        total = sum(
            n for topic, n in self._dropped.items()
            if _of_session(session, topic)
        )
        return {"hwm": total} if total else {}

    def _control(self, session: str, event: str, **fields: Any) -> bool:
        topic = ctl_topic(session)
        seq = self._next_seq.get(topic, 0)
        now = self._clock()
        frames = encode_control(session, event, seq=seq, t_publish=now, **fields)
        self._sessions[session].last_control = now
        self._next_seq[topic] = seq + 1
        if self._send(*frames, control=True):
            return True
        self._dropped[topic] += 1
        log.warning("session %r: %s control message dropped (subscriber too slow)", session, event)
        return False
