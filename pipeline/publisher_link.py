"""A session's calls to the publisher, surviving a publisher restart (docs/guarantees.md).

Every topic of a session is written by its aligner alone, so the session keeps the one true
count of the seqs it has used (:class:`pipeline.dispatch.PublishLedger`) and hands a restarted
publisher the point to continue from: seqs never repeat; those a dead call burned show as a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from pipeline.dispatch import PublishLedger, backoff_s
from pipeline.publisher_actor import PublisherRestartedError
from pipeline.run_loop import error_line

__all__ = ["PublisherLink"]

log = logging.getLogger(__name__)


class PublisherLink:
    """``publisher`` (a Ray actor handle) as session ``session`` calls it. ``start``: the model
    and dim a restarted publisher needs, and the seqs the session's ``start`` used."""

    def __init__(self, session: str, streams: dict[str, str], publisher: Any, start: dict[str, Any],
                 restart_timeout_s: float, on_lost: Callable[[str], None]) -> None:
        self.session, self.streams, self.publisher = session, streams, publisher
        self._start = dict(start)
        self.ledger = PublishLedger(self._start.get("seqs"))
        self.restart_timeout_s = restart_timeout_s
        self.on_lost = on_lost
        self._lock = asyncio.Lock()  # one call at a time: the ledger is exact when resuming

    async def call(self, method: str, *args: Any, claims: dict[str, int], **kwargs: Any) -> bool:
        """``publisher.<method>(*args, **kwargs)``, surviving a publisher restart: a call lost
        with the process (``RayActorError``) or refused by the new incarnation
        (:class:`PublisherRestartedError`) is re-sent after :meth:`_resume`, for up to
        ``restart_timeout_s``. False (and ``on_lost`` told why, so the run exits 3) when the
        publisher is gone for good."""
        from ray.exceptions import ActorDiedError, RayActorError

        deadline = time.monotonic() + self.restart_timeout_s
        attempt = 0
        async with self._lock:  # one call at a time: the ledger is exact when resuming
            while True:
                attempt += 1
                self.ledger.claim(claims)
                try:
                    seqs = await getattr(self.publisher, method).remote(*args, **kwargs)
                except (RayActorError, PublisherRestartedError) as exc:
                    if isinstance(exc, PublisherRestartedError):  # refused: consumed no seq
                        self.ledger.refund(claims)
                    log.warning("session '%s': publisher %s failed (attempt %d), resuming and re-sending: %s",
                                self.session, method, attempt, str(exc).splitlines()[0])
                    if (isinstance(exc, ActorDiedError) and await self._dead()) \
                            or time.monotonic() > deadline or not await self._resume(deadline):
                        self._lost(exc)
                        return False
                    continue
                self.ledger.settle(seqs)
                return True

    async def _resume(self, deadline: float) -> bool:
        """Hand the (restarted) publisher this session and the seqs to continue from."""
        from ray.exceptions import RayActorError

        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            try:
                await self.publisher.resume.remote(
                    self.session, self.streams, self._start.get("model"), int(self._start.get("dim") or 1024),
                    self.ledger.resume_point())
                self.ledger.resumed()
                log.warning("session '%s': publisher resumed at %s", self.session, self.ledger.resume_point())
                return True
            except RayActorError:  # still restarting
                await asyncio.sleep(backoff_s(attempt))
        return False

    async def _dead(self) -> bool:
        from ray.exceptions import ActorDiedError

        try:
            await asyncio.wait_for(self.publisher.pid.remote(), 60.0)
            return False
        except ActorDiedError:
            return True
        except Exception:
            return False

    def _lost(self, exc: Exception) -> None:
        error = f"publisher lost: {error_line(exc)}"
        log.error("session '%s': %s", self.session, error)
        self.on_lost(error)
