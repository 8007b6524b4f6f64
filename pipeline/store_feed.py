"""What a session adds to the embedding store besides its embeddings: the caption text of each
text window and (``store.thumbnails``) a JPEG of each vision window's middle frame, made from the
windows the session actor has just published (docs/store.md).

Only the session actor sees the windows' data; the store writer runs in the publisher actor.
:class:`StoreFeed` makes the rows in a worker thread of the session's process, after the
embeddings are published, and hands them to the publisher with one call per batch: publishing
never waits on a JPEG, and the publisher only queues the rows for its writer thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from pipeline.session_triggers import jpeg_image
from sinks.store_tables import CaptionRow, ThumbnailRow

__all__ = ["THUMB_MAX_BYTES", "THUMB_WIDTH", "StoreFeed", "window_rows"]

log = logging.getLogger(__name__)

THUMB_WIDTH = 128  # pixels; the height keeps the frame's aspect
THUMB_MAX_BYTES = 8 * 1024  # a JPEG over this is encoded again coarser


def window_rows(model: str, records: Sequence[Any], payloads: Sequence[Any]) -> list[Any]:
    """The store rows of published windows: a :class:`CaptionRow` per text window whose payload
    is caption text, a :class:`ThumbnailRow` per vision window whose payload is a frame
    ``[H, W, 3]`` (the window's middle one). ``records``: the windows' records (session, stream,
    modality, window, t_start, t_end); ``payloads``: what each one kept, same order."""
    rows: list[Any] = []
    for r, p in zip(records, payloads):
        where = (model, r.session, r.stream, r.modality, int(r.window), float(r.t_start), float(r.t_end))
        if r.modality == "text":
            rows.append(CaptionRow(*where, text=p))
        else:
            jpeg, width, height = jpeg_image(p, THUMB_WIDTH, max_bytes=THUMB_MAX_BYTES)
            rows.append(ThumbnailRow(*where, width=width, height=height, jpeg=jpeg))
    return rows


class StoreFeed:
    """A session's thumbnails and captions, off the publishing path: :meth:`add` what was just
    published (on the session's event loop; returns at once), :meth:`drain` before the session's
    ``end`` so its report counts them. ``send(rows)`` hands rows to the store writer."""

    def __init__(self, model: str, send: Callable[[list[Any]], Awaitable[Any]], *, thumbnails: bool = False) -> None:
        self.model = model
        self.thumbnails = thumbnails
        self._send = send
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-rows")
        self._tasks: set[asyncio.Task] = set()
        self.lost = 0  # rows that could not be handed over (the publisher was gone)

    def add(self, records: Sequence[Any], items: Sequence[Any]) -> None:
        """Windows just published (records and the window items behind them, same order)."""
        picked, payloads = [], []
        for r, item in zip(records, items):
            if r.modality == "text" and isinstance(item.payload, str) and item.payload.strip():
                picked.append(r)
                payloads.append(item.payload)
            elif r.modality == "vision" and self.thumbnails:
                frames = np.asarray(item.payload)  # [T, H, W, 3]
                picked.append(r)
                payloads.append(frames[len(frames) // 2])
        if not picked:
            return
        loop = asyncio.get_running_loop()
        made = loop.run_in_executor(self._pool, window_rows, self.model, picked, payloads)
        task = loop.create_task(self._deliver(made, len(picked)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, made: Awaitable[list[Any]], n: int) -> None:
        try:
            await self._send(await made)
        except Exception as exc:  # a frame that does not encode, or the publisher gone: the rows are lost
            self.lost += n
            log.warning("%d store row(s) (thumbnails, captions) not handed over: %s", n, exc)

    async def drain(self) -> None:
        """Wait until every row added so far is handed over (or lost); stop the worker thread."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._pool.shutdown(wait=False)
