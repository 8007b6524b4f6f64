"""Dynamic batching for an encoder's towers: one small policy object, no Ray inside.

Callers ``await batcher.submit_many(tower, items)``. Each tower has its own queue; one runner
task runs one batch at a time through ``fn(tower, items) -> results`` (an encoder has one forward
thread, so towers never compete for the device or the cores). A batch is formed **when the
runner is free**, not when its first item arrives: the runner takes the tower whose oldest item
has waited longest, and that tower's queued items up to ``max_batch``. Items that arrive while
other batches run therefore join the next batch of their tower instead of queueing behind it
one by one (several sessions' windows end at the same instant: their items all meet in one
batch per tower). Only an idle runner waits, up to ``max_wait_s`` after a tower's first item,
for more of it. The output length is checked against the input length.

One item cannot fail the others of its batch. ``fn`` may put an exception in place of an item's
result (an embedding that came out non-finite): that item's caller gets it, the others their
results. When a batch fails as a whole (``fn`` or ``prepare`` raised, or returned the wrong
number of results), its items are tried again one by one, each in a batch of its own: only an
item that fails alone gets an exception. Other batches still run.

``prepare`` (optional) splits a batch's work into two stages run by different workers:
``prepare(tower, items) -> staged`` then ``fn(tower, staged) -> results``. The runner prepares a
batch, hands it to ``fn`` and goes on to form and prepare the next one while ``fn`` runs: at most
two batches are in flight, one in each stage. The next batch is formed when the runner is free
again, as above; with one batch waiting for ``fn`` the runner waits too, so no batch is formed
long before it can run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Awaitable, Callable

__all__ = ["TowerBatcher"]

log = logging.getLogger(__name__)


class TowerBatcher:
    def __init__(
        self,
        fn: Callable[[str, list[Any]], Awaitable[list[Any]]],
        max_batch: int = 32,
        max_wait_s: float = 0.02,
        name: str = "batch",
        prepare: Callable[[str, list[Any]], Awaitable[Any]] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self.prepare = prepare
        self._slots: asyncio.Semaphore | None = None  # batches in flight: 1, or 2 with prepare
        self._fn_lock: asyncio.Lock | None = None  # one fn at a time, in the order batches were formed
        self._running: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        # tower -> (arrival time, item, future), oldest first
        self._queues: dict[str, collections.deque[tuple[float, Any, asyncio.Future]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: dict[str, list[int]] = collections.defaultdict(list)  # every batch run, per tower

    def depth(self, tower: str) -> int:
        """Items of ``tower`` waiting for a batch."""
        q = self._queues.get(tower)
        return len(q) if q is not None else 0

    async def submit_many(self, tower: str, items: list[Any], *, return_exceptions: bool = False) -> list[Any]:
        """The results of ``items``, in order. An item that failed raises its exception here, or
        with ``return_exceptions`` stands in the list in place of its result."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(1 if self.prepare is None else 2)
            self._fn_lock = asyncio.Lock()
            self._task = loop.create_task(self._run())
        q = self._queues.setdefault(tower, collections.deque())
        now = loop.time()
        futs = [loop.create_future() for _ in items]
        q.extend((now, item, fut) for item, fut in zip(items, futs))
        self._wake.set()
        return list(await asyncio.gather(*futs, return_exceptions=return_exceptions))

    async def _next_batch(self) -> tuple[str, list[tuple[float, Any, asyncio.Future]]]:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            heads = [(q[0][0], tower) for tower, q in self._queues.items() if q]
            if not heads:
                self._wake.clear()
                await self._wake.wait()
                continue
            first, tower = min(heads)
            q = self._queues[tower]
            remaining = first + self.max_wait_s - loop.time()
            if len(q) < self.max_batch and remaining > 0:
                # Idle: give the oldest tower until its deadline to fill up (anything arriving
                # wakes us to look again).
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                continue
            return tower, [q.popleft() for _ in range(min(len(q), self.max_batch))]

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            tower, batch = await self._next_batch()
            self.batch_sizes[tower].append(len(batch))
            items = [b[1] for b in batch]
            if self.prepare is None:
                await self._finish(tower, batch, items)
                continue
            try:
                staged = await self.prepare(tower, items)
            except Exception as exc:
                self._spawn(self._retry(tower, batch, exc))
                continue
            self._spawn(self._finish(tower, batch, staged))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _call(self, tower: str, arg: Any, n: int) -> list[Any]:
        """``fn`` on one batch of ``n`` items (or what ``prepare`` made of them)."""
        assert self._fn_lock is not None
        async with self._fn_lock:  # FIFO: a prepared batch waits for the one before it
            results = await self.fn(tower, arg)
        if len(results) != n:
            raise RuntimeError(f"{self.name}[{tower}]: batch function returned {len(results)} results for {n} items")
        return results

    async def _finish(self, tower: str, batch: list[tuple[float, Any, asyncio.Future]], arg: Any) -> None:
        """Run ``fn`` on one batch (its items, or what ``prepare`` made of them) and deliver;
        a failed batch is tried again item by item. Frees the batch's slot."""
        assert self._slots is not None
        try:
            try:
                results = await self._call(tower, arg, len(batch))
            except Exception as exc:
                await self._one_by_one(tower, batch, exc)
                return
        finally:
            self._slots.release()
        for (_, _, fut), res in zip(batch, results):
            _deliver(fut, res)

    async def _retry(self, tower: str, batch: list[tuple[float, Any, asyncio.Future]], exc: Exception) -> None:
        """A batch that could not be prepared, item by item; frees its slot."""
        assert self._slots is not None
        try:
            await self._one_by_one(tower, batch, exc)
        finally:
            self._slots.release()

    async def _one_by_one(self, tower: str, batch: list[tuple[float, Any, asyncio.Future]], exc: Exception) -> None:
        """Each item of a failed batch in a batch of its own, so only an item that fails alone
        gets an exception (a batch of one gets the batch's)."""
        if len(batch) == 1:
            self._fail(tower, batch[0][2], exc)
            return
        log.warning("%s[%s]: batch of %d failed (%s: %s); trying its items one by one",
                    self.name, tower, len(batch), type(exc).__name__, exc)
        log.debug("%s[%s]: the batch's error", self.name, tower, exc_info=exc)
        for _, item, fut in batch:
            try:
                arg = [item] if self.prepare is None else await self.prepare(tower, [item])
                (res,) = await self._call(tower, arg, 1)
            except Exception as one:
                self._fail(tower, fut, one)
                continue
            _deliver(fut, res)

    def _fail(self, tower: str, fut: asyncio.Future, exc: Exception) -> None:
        log.warning("%s[%s]: an item failed on its own: %s: %s", self.name, tower, type(exc).__name__, exc)
        log.debug("%s[%s]: the item's error", self.name, tower, exc_info=exc)
        if not fut.done():
            fut.set_exception(exc)


def _deliver(fut: asyncio.Future, res: Any) -> None:
    """An item's result to its caller; an exception in its place is raised there."""
    if fut.done():
        return
    if isinstance(res, BaseException):
        fut.set_exception(res)
    else:
        fut.set_result(res)
