"""Where an aligner's calls go and how often they are tried: plain classes, the clock passed in.

* :class:`EncoderDispatch`: the least-loaded live encoder replica, this session's items in
  flight per replica, replicas found dead, and per batch a :class:`RetryBudget` that says
  "try replica ``i`` after ``delay_s``" or "give up".
* :class:`PublishLedger`: the session's next ``seq`` per topic, kept so that a restarted
  publisher resumes where no seq can repeat (docs/guarantees.md).

The retry rule (encoders are pure functions of their input, so a batch run twice gives the
same rows, and each window's result is used once: delivery stays exactly-once):

* A call *lost* with a dead or restarting replica (Ray restarts it, ``max_restarts``) is not
  the batch's fault: it is re-sent, to another live replica where there is one, for up to
  ``restart_timeout_s`` from the batch's first try, ``min(2, 0.2 * attempt)`` s apart.
* A batch the encoder *refuses* (an exception inside ``encode``) is retried ``retries``
  times, ``0.5 * failures`` s apart, on another replica where there is one.
* With no live replica, or the budget spent, the batch's items are dropped and counted as
  ``<modality>:encoder_error``.
* An item the encoder could not embed on its own (it runs a failed batch's items one by one)
  is not retried: it fails the same way on any replica. It is counted as
  ``<modality>:encoder_error`` too; the rest of its batch is used.

Windows whose samples the encoder left out as bad values (non-finite, or beyond the tower's
range: :func:`encoders.preprocess.without_bad_values`) are counted per stream as
``<stream>:bad_values``.

Every re-send counts in :attr:`EncoderDispatch.retries_done` (the summary's ``encode_retries``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["Attempt", "EncoderDispatch", "PublishLedger", "RetryBudget", "backoff_s"]


def backoff_s(attempt: int) -> float:
    """Wait before re-sending to a restarting actor after ``attempt`` tries."""
    return min(2.0, 0.2 * attempt)


@dataclass(frozen=True)
class Attempt:
    """Try the batch on ``replica`` after ``delay_s`` seconds."""

    replica: int
    delay_s: float


class EncoderDispatch:
    def __init__(self, replicas: int, retries: int = 2, restart_timeout_s: float = 120.0) -> None:
        self.load = [0] * replicas  # items in flight per replica, from this session
        self.dead: set[int] = set()
        self.retries = max(0, int(retries))
        self.restart_timeout_s = float(restart_timeout_s)
        self.retries_done = 0
        self.errors: collections.Counter[str] = collections.Counter()  # modality -> items dropped
        self.bad: collections.Counter[str] = collections.Counter()  # stream -> windows with bad values

    def live(self) -> list[int]:
        return [i for i in range(len(self.load)) if i not in self.dead]

    def pick(self, avoid: int | None = None) -> int | None:
        """The least-loaded live replica, another than ``avoid`` where there is one; ``None``
        when every replica is dead."""
        live = self.live()
        if not live:
            return None
        return min(live, key=lambda i: (i == avoid, self.load[i], i))

    def sent(self, replica: int, n: int) -> None:
        self.load[replica] += n

    def returned(self, replica: int, n: int) -> None:
        """The call carrying ``n`` items came back (with rows or an error)."""
        self.load[replica] -= n

    def mark_dead(self, replica: int) -> None:
        """``replica`` is gone for good (its restarts are exhausted): never picked again."""
        self.dead.add(replica)

    def budget(self, modality: str, n: int, now: float, refused_on: int | None = None) -> "RetryBudget":
        """The budget of one batch of ``n`` items first tried at ``now``; ``refused_on``: the
        replica that already refused it (one try spent, in a call carrying every tower)."""
        return RetryBudget(self, modality, n, now, refused_on)

    def failed(self, modality: str, n: int) -> None:
        """``n`` items of ``modality`` failed on their own: dropped, not retried."""
        if n:
            self.errors[modality] += n

    def bad_values(self, stream: str) -> bool:
        """A window of ``stream`` held bad values; True for the stream's first."""
        self.bad[stream] += 1
        return self.bad[stream] == 1

    def dropped(self) -> dict[str, int]:
        out = {f"{m}:encoder_error": n for m, n in self.errors.items()}
        out.update((f"{s}:bad_values", n) for s, n in self.bad.items())
        return out


class RetryBudget:
    """One batch's tries: call :meth:`next` for the next :class:`Attempt` (``None``: give up,
    the items are then counted as dropped), and report how each try failed with :meth:`lost`
    or :meth:`refused`."""

    def __init__(self, dispatch: EncoderDispatch, modality: str, n: int, now: float,
                 refused_on: int | None = None) -> None:
        self._d = dispatch
        self.modality, self.n = modality, n
        self.deadline = now + dispatch.restart_timeout_s
        self.attempts = 0
        self.failures = 0
        self._delay = 0.0
        self._avoid: int | None = None
        self._expired = False
        self._gave_up = False
        if refused_on is not None:
            self.attempts = 1
            self.refused(refused_on)

    def next(self) -> Attempt | None:
        if self._gave_up:
            return None
        replica = self._d.pick(self._avoid)
        if replica is None or self._expired or self.failures > self._d.retries:
            self._gave_up = True
            self._d.errors[self.modality] += self.n
            return None
        self.attempts += 1
        return Attempt(replica, self._delay)

    def lost(self, replica: int, now: float) -> None:
        """The try on ``replica`` was lost with the process (dead or restarting)."""
        self._d.retries_done += 1
        self._avoid = replica
        self._delay = backoff_s(self.attempts)
        self._expired = now > self.deadline

    def refused(self, replica: int) -> None:
        """The encoder on ``replica`` raised for this batch."""
        self.failures += 1
        self._avoid = replica
        self._delay = 0.5 * self.failures
        if self.failures <= self._d.retries:
            self._d.retries_done += 1


class PublishLedger:
    """The session's next ``seq`` per topic: at or past what the publisher used, always.

    Every topic of a session (``ctl/<session>``, ``emb/<session>/<modality>``) is written by its
    aligner alone (plus the driver's ``start``, whose seqs seed the ledger). Before each call
    the caller :meth:`claim`\\ s the seqs the call will consume (one per record of a topic, one
    per control message): a call that dies half-way has used at most those, so the ledger stays
    at or past the publisher. A call the publisher refused (``PublisherRestartedError``)
    consumed none: :meth:`refund`. A call that returns the publisher's own table is
    :meth:`settle`\\ d (the larger of both wins). A restarted publisher is resumed at
    :meth:`resume_point`: seqs never repeat; the ones a dead call burned show up as a gap.
    Calls must not overlap (the caller holds one lock around claim .. settle).
    """

    def __init__(self, seqs: Mapping[str, int] | None = None) -> None:
        self._next: dict[str, int] = {str(k): int(v) for k, v in (seqs or {}).items()}
        self.restarts = 0  # resumes of a restarted publisher

    def claim(self, claims: Mapping[str, int]) -> None:
        for topic, n in claims.items():
            self._next[topic] = self._next.get(topic, 0) + int(n)

    def refund(self, claims: Mapping[str, int]) -> None:
        for topic, n in claims.items():
            self._next[topic] = self._next.get(topic, 0) - int(n)

    def settle(self, seqs: Mapping[str, int] | None) -> None:
        for topic, n in (seqs or {}).items():
            self._next[topic] = max(self._next.get(topic, 0), int(n))

    def resume_point(self) -> dict[str, int]:
        return dict(self._next)

    def resumed(self) -> None:
        self.restarts += 1

    @staticmethod
    def count(topics: Iterable[str]) -> dict[str, int]:
        """Claims for one record (or message) per topic in ``topics``."""
        return dict(collections.Counter(topics))
