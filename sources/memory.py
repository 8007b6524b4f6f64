"""A list-backed source: the test double that tests (and users) can import.

It behaves like any other source (``spec``, ``dropped``, ``__iter__`` of :class:`Chunk`), so a
test can drive an :class:`~pipeline.align.Aligner` or a recorder with hand-made chunks.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from sources.base import Chunk

__all__ = ["ListSource"]


class ListSource:
    def __init__(self, chunks: Iterable[Chunk], spec: Any = None, error: Exception | None = None) -> None:
        self.chunks = list(chunks)
        self.spec = spec
        self.error = error  # raised after the last chunk, like a replay source hitting a corrupt tail
        self.dropped: dict[str, int] = {}

    def __iter__(self) -> Iterator[Chunk]:
        yield from self.chunks
        if self.error is not None:
            raise self.error
