"""Dynamic batching: one small policy object, no Ray inside.

Like Ray Serve's ``@serve.batch``: callers ``await queue.submit(item)``; a background task
gathers up to ``max_batch`` items, or whatever arrived within ``max_wait_s`` of the first one,
and calls ``fn(list) -> list`` once. The output length is checked against the input length, and
one failure is delivered to every item of its batch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, TypeVar

__all__ = ["BatchQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchQueue(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[list[R]]],
        max_batch: int = 32,
        max_wait_s: float = 0.02,
        name: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # every batch run, for metrics and tests

    def __len__(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def submit_many(self, items: list[T]) -> list[R]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    async def _take_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            # Whatever is already queued joins without waiting.
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = deadline - asyncio.get_running_loop().time()
            if len(batch) >= self.max_batch or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._take_batch()
            items = [b[0] for b in batch]
            self.batch_sizes.append(len(items))
            try:
                results = await self.fn(items)
                if len(results) != len(items):
                    raise RuntimeError(
                        f"{self.name}: batch function returned {len(results)} results for {len(items)} items"
                    )
            except Exception as exc:  # delivered to every caller of this batch
                log.exception("%s: batch of %d failed", self.name, len(items))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
