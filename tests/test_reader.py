"""The port between a stream's reader thread and its session's event loop (pipeline/reader.py):
backpressure, the window origin, refusals. A real event loop in a thread, as in an aligner."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import numpy as np
import pytest

from pipeline.reader import SessionPort
from sources.base import Chunk


class _GatedSession:
    """A session that applies pushes only while ``gate`` is open; refuses chunk ``refuse``."""

    def __init__(self, refuse: int | None = None) -> None:
        self.gate = asyncio.Event()
        self.applied: list[int] = []
        self.ended: list[tuple] = []
        self.refuse = refuse

    async def push(self, chunk: Any, seq: int) -> float | None:
        await self.gate.wait()
        if seq == self.refuse:
            raise ValueError(f"chunk {seq} refused")
        self.applied.append(seq)
        return 10.0 if len(self.applied) >= 3 else None  # the origin is fixed from the 3rd chunk on

    async def wait_origin(self, timeout_s: float) -> float | None:
        return None

    async def end_stream(self, stream: str, error: str | None = None, dropped: dict | None = None,
                         chunks: int | None = 0) -> None:
        self.ended.append((stream, error, chunks))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _chunk() -> Chunk:
    return Chunk(stream="imu", modality="imu", t=np.zeros(1), data=np.zeros((1, 6), dtype=np.float32))


def test_reader_blocks_once_max_inflight_pushes_are_held_and_goes_on_when_the_session_takes_them(loop) -> None:
    session = _GatedSession()
    port = SessionPort(session, loop, "imu", max_inflight=3)
    pushed: list[int] = []

    def reader() -> None:
        for seq in range(5):
            port.push(_chunk(), seq)
            pushed.append(seq)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and pushed == [0, 1, 2], "the 4th push must wait while 3 are held"
    loop.call_soon_threadsafe(session.gate.set)
    thread.join(10)
    assert pushed == [0, 1, 2, 3, 4]
    port.flush()
    assert session.applied == [0, 1, 2, 3, 4]
    assert port.push(_chunk(), 5) == 10.0  # the session's origin, once it has one
    port.end(None, {}, 6)
    assert session.ended == [("imu", None, 6)]


def test_a_refused_chunk_fails_the_reader_and_the_stream_still_ends(loop) -> None:
    session = _GatedSession(refuse=1)
    loop.call_soon_threadsafe(session.gate.set)
    port = SessionPort(session, loop, "imu", max_inflight=2)
    with pytest.raises(ValueError, match="chunk 1 refused"):
        for seq in range(4):
            port.push(_chunk(), seq)
        port.flush()
    port.end("ValueError: chunk 1 refused", {}, 4)
    assert session.ended == [("imu", "ValueError: chunk 1 refused", 4)]
