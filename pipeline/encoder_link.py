"""A session's calls to the encoder replicas, surviving a replica's death or restart.

Which replica and when to retry is :class:`pipeline.dispatch.EncoderDispatch`'s decision; this
class makes the Ray calls it asks for and reports back how each went.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import numpy as np

from pipeline.align import WindowItem
from pipeline.dispatch import EncoderDispatch
from pipeline.encoder_actor import TowerRows

__all__ = ["EncoderLink"]

log = logging.getLogger(__name__)


class EncoderLink:
    """``encoders`` (Ray actor handles) as one session uses them; ``observer`` gets each
    item's forward start and end. ``per_tower``: a release's rows come back tower by tower as
    each finishes (paced replay and live, where latency counts); otherwise in one answer per
    call (``rate: 0``, where throughput counts: one Ray reply instead of one per tower)."""

    def __init__(self, session: str, encoders: list[Any], dispatch: EncoderDispatch, observer: Any,
                 per_tower: bool = True) -> None:
        self.session, self.encoders, self.dispatch, self.observer = session, encoders, dispatch, observer
        self.per_tower = per_tower
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def start(self, by_modality: dict[str, list[WindowItem]]) -> dict[str, asyncio.Future]:
        """Encode every item of one release; per modality a future of its rows (in item order),
        set as soon as that tower has answered. One call to the least-loaded encoder carries
        every modality (:meth:`pipeline.encoder_actor.EncoderActor.encode_each`, a streaming
        call, or with ``per_tower`` off :meth:`~pipeline.encoder_actor.EncoderActor.encode_many`). A
        modality whose batch failed there, or every modality not yet answered when the call
        itself failed (a dead or restarting encoder), goes through :meth:`_encode`, which
        retries it on its own. An item the encoder could not embed alone
        (:class:`pipeline.encoder_actor.TowerRows`) is ``None``, counted, and not retried: it
        fails the same way anywhere."""
        loop = asyncio.get_running_loop()
        futs = {m: loop.create_future() for m in by_modality}
        task = loop.create_task(self._release(by_modality, futs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return futs

    async def _release(self, by_modality: dict[str, list[WindowItem]], futs: dict[str, asyncio.Future]) -> None:
        try:
            refused = await self._encode_release(by_modality, futs)
            await asyncio.gather(*(self._retry(m, items, futs[m], refused.get(m))
                                   for m, items in by_modality.items() if not futs[m].done()))
        except BaseException as exc:  # no future is left unset: the publishing side waits on them
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _retry(self, modality: str, items: list[WindowItem], fut: asyncio.Future, refused_on: int | None) -> None:
        fut.set_result(await self._encode(modality, items, refused_on=refused_on))

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

    async def _answers(self, i: int, groups: dict[str, list[Any]]) -> AsyncIterator[tuple[str, Any]]:
        """Encoder ``i``'s answer for each tower of ``groups``: as each tower finishes, or all at once."""
        if self.per_tower:
            async for ref in self.encoders[i].encode_each.remote(groups):
                yield await ref
        else:
            for answer in (await self.encoders[i].encode_many.remote(groups)).items():
                yield answer

    async def _encode_release(self, by_modality: dict[str, list[WindowItem]],
                              futs: dict[str, asyncio.Future]) -> dict[str, int]:
        """Every tower of a release on the least-loaded live replica (:meth:`_answers`); each
        tower's rows go to its future as they come. Returns the modalities whose
        tower refused its batch, with the replica; a modality neither answered nor refused was
        lost with the call (or no replica is left)."""
        i = self.dispatch.pick()
        if i is None:
            return {}
        left = {m: len(items) for m, items in by_modality.items()}
        self.dispatch.sent(i, sum(left.values()))
        refused: dict[str, int] = {}
        try:
            async for m, got in self._answers(i, {m: [it.payload for it in items] for m, items in by_modality.items()}):
                self.dispatch.returned(i, left.pop(m))
                if isinstance(got, TowerRows):
                    futs[m].set_result(self._take(m, by_modality[m], got))
                else:  # the tower refused the batch: one attempt spent
                    log.warning("session '%s': %s batch of %d failed on encoder %d: %s",
                                self.session, m, len(by_modality[m]), i, got)
                    refused[m] = i
        except Exception as exc:  # lost with the encoder, or refused: the rest on their own
            log.warning("session '%s': encoder %d lost %d items of a release, re-sending per modality: %s",
                        self.session, i, sum(left.values()), str(exc).splitlines()[0])
        finally:
            if left:
                self.dispatch.returned(i, sum(left.values()))
        return refused

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
