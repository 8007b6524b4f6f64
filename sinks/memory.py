"""A list-backed sink for tests and users.

:class:`ListSink` is the :class:`~sinks.base.SinkBase` transport for a Python list, so tests
see exactly the bytes the ZeroMQ publisher would send, decoded.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

from sinks.protocol import DEFAULT_MODEL, Message, decode
from sinks.base import SinkBase

__all__ = ["ListSink"]


class ListSink(SinkBase):
    """A sink that decodes every message into :attr:`messages` (a list of
    :class:`~sinks.protocol.Message`), in send order. Never drops."""

    def __init__(self, *, model_name: str = DEFAULT_MODEL, resume_seqs: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(model_name=model_name, resume_seqs=resume_seqs, clock=clock)
        self.messages: list[Message] = []

    def _send(self, topic: bytes, payload: bytes, *, control: bool) -> bool:
        self.messages.append(decode([topic, payload]))
        return True

    def embeddings(self, modality: str | None = None) -> list[Message]:
        """The embedding messages received so far, optionally of one modality."""
        return [m for m in self.messages if m.kind == "embedding" and modality in (None, m.modality)]
