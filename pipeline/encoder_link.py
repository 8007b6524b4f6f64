"""A session's calls to the encoder replicas, surviving a replica's death or restart.

Which replica and when to retry is :class:`pipeline.dispatch.EncoderDispatch`'s decision; this
class makes the Ray calls it asks for and reports back how each went.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from pipeline.align import WindowItem
from pipeline.dispatch import EncoderDispatch
from pipeline.encoder_actor import TowerRows

__all__ = ["EncoderLink"]

log = logging.getLogger(__name__)


class EncoderLink:
    """``encoders`` (Ray actor handles) as one session uses them; ``observer`` gets each
    item's forward start and end."""

    def __init__(self, session: str, encoders: list[Any], dispatch: EncoderDispatch, observer: Any) -> None:
        self.session, self.encoders, self.dispatch, self.observer = session, encoders, dispatch, observer

    async def encode(self, by_modality: dict[str, list[WindowItem]]) -> list[np.ndarray | None]:
        """The rows of every item of one release, concatenated in ``by_modality`` order: one call
        to the least-loaded encoder carries every modality (:meth:`pipeline.encoder_actor.EncoderActor.encode_many`). A
        modality whose batch failed there, or every modality when the call itself failed (a dead
        or restarting encoder), goes through :meth:`_encode`, which retries it on its own. An item
        the encoder could not embed alone (:class:`pipeline.encoder_actor.TowerRows`) is ``None``,
        counted, and not retried: it fails the same way anywhere."""
        out, i = await self._encode_many(by_modality)
        parts: list[Any] = []  # per modality its rows, or the task retrying it (all retries run at once)
        for m, items in by_modality.items():
            got = out.get(m)
            if isinstance(got, TowerRows):
                parts.append(self._take(m, items, got))
                continue
            if got is not None:  # the tower refused the batch: one attempt spent
                log.warning("session '%s': %s batch of %d failed on encoder %d: %s",
                            self.session, m, len(items), i, got)
            parts.append(asyncio.ensure_future(self._encode(m, items, refused_on=i if got is not None else None)))
        rows: list[np.ndarray | None] = []
        for part in parts:
            rows.extend(await part if isinstance(part, asyncio.Future) else part)
        return rows

    def _take(self, modality: str, items: list[WindowItem], got: TowerRows) -> list[np.ndarray | None]:
        """``got``'s rows, after counting what it says about each item: windows that held bad
        values per stream, items that failed alone as ``<modality>:encoder_error``."""
        for j, n in got.bad.items():
            it = items[j]
            if self.dispatch.bad_values(it.stream):  # the first window of the stream: the others are counted
                log.warning("session '%s' stream '%s' window %d: %d %s samples not finite or beyond the tower's "
                            "range, left out%s; counted as '%s:bad_values'", self.session, it.stream, it.window, n,
                            modality, " (none left: not encoded)" if got.rows[j] is None else "", it.stream)
        for j, err in got.errors.items():
            log.warning("session '%s' stream '%s' window %d: the %s encoder failed on this item alone: %s",
                        self.session, items[j].stream, items[j].window, modality, err)
        self.dispatch.failed(modality, len(got.errors))
        done = [j for j, span in enumerate(got.spans) if span is not None]
        if done:
            self.observer.forwarded([items[j] for j in done], [got.spans[j] for j in done])
        return got.rows

    async def _encode_many(self, by_modality: dict[str, list[WindowItem]]) -> tuple[dict[str, Any], int | None]:
        """:meth:`pipeline.encoder_actor.EncoderActor.encode_many` on the least-loaded live replica, and which one;
        ``{}`` where the call was lost (or no replica is left)."""
        i = self.dispatch.pick()
        if i is None:
            return {}, None
        n = sum(len(items) for items in by_modality.values())
        self.dispatch.sent(i, n)
        try:
            return await self.encoders[i].encode_many.remote(
                {m: [it.payload for it in items] for m, items in by_modality.items()}), i
        except Exception as exc:  # lost with the encoder, or refused: every modality on its own
            log.warning("session '%s': encoder %d lost a release of %d items, re-sending per modality: %s",
                        self.session, i, n, str(exc).splitlines()[0])
            return {}, i
        finally:
            self.dispatch.returned(i, n)

    async def _encode(self, modality: str, items: list[WindowItem], refused_on: int | None = None) -> list[Any]:
        """Results for ``items``, tried as :class:`pipeline.dispatch.RetryBudget` says; ``None``
        rows (counted as ``<modality>:encoder_error``) once it gives up."""
        from ray.exceptions import ActorDiedError, RayActorError

        payloads = [it.payload for it in items]
        budget = self.dispatch.budget(modality, len(items), time.monotonic(), refused_on)
        last_exc: Exception | None = None
        while (step := budget.next()) is not None:
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)
            i = step.replica
            self.dispatch.sent(i, len(items))
            try:
                return self._take(modality, items, await self.encoders[i].encode_timed.remote(modality, payloads))
            except RayActorError as exc:  # the actor died, or is restarting
                last_exc = exc
                log.warning("session '%s': encoder %d lost a %s batch of %d (attempt %d), re-sending: %s",
                            self.session, i, modality, len(items), budget.attempts, str(exc).splitlines()[0])
                if isinstance(exc, ActorDiedError) and await self._encoder_dead(i):
                    self.dispatch.mark_dead(i)
                    log.error("session '%s': encoder %d is dead (restarts exhausted)", self.session, i)
                budget.lost(i, time.monotonic())
            except Exception as exc:  # the batch failed inside the encoder
                last_exc = exc
                log.warning("session '%s': %s batch of %d failed on encoder %d (attempt %d): %s",
                            self.session, modality, len(items), i, budget.attempts, exc)
                budget.refused(i)
            finally:
                self.dispatch.returned(i, len(items))
        log.error("session '%s': dropping %d %s items after %d attempts: %s",
                  self.session, len(items), modality, budget.attempts, last_exc)
        return [None] * len(items)

    async def _encoder_dead(self, i: int) -> bool:
        """True when encoder ``i`` is gone for good; False while it is alive or restarting."""
        from ray.exceptions import ActorDiedError

        try:
            await asyncio.wait_for(self.encoders[i].info.remote(), 60.0)
            return False
        except ActorDiedError:
            return True
        except Exception:
            return False
