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


# -- what paced text asks the session's ports: have the other streams ended, and where -----------


def test_read_progress_gives_the_other_streams_end_once_every_one_that_is_not_text_has_ended(loop) -> None:
    from pipeline.reader import ReadProgress

    progress = ReadProgress({"cam": "vision", "imu": "imu", "captions": "text", "notes": "text"})
    session = _GatedSession()
    loop.call_soon_threadsafe(session.gate.set)
    cam = SessionPort(session, loop, "cam", 2, progress)
    imu = SessionPort(session, loop, "imu", 2, progress)
    cam.push(Chunk("cam", "vision", np.array([0.0, 2.9]), np.zeros((2, 2, 2, 3), dtype=np.uint8)), 0)
    imu.push(Chunk("imu", "imu", np.array([3.1]), np.zeros((1, 6), dtype=np.float32)), 0)
    assert cam.sensors_end() is None  # both still read
    cam.end(None, {}, 1)
    assert imu.sensors_end() is None
    imu.end(None, {}, 1)
    assert cam.sensors_end() == imu.sensors_end() == 3.1  # the text streams neither count nor hold it back
    assert SessionPort(session, loop, "notes", 2).sensors_end() is None  # a port without the session's progress
    nothing = ReadProgress({"cam": "vision", "captions": "text"})
    nothing.ended("cam")
    assert nothing.sensors_end() is None  # no sample to compare a caption with
    assert ReadProgress({"captions": "text"}).sensors_end() is None  # text alone: nothing to compare with


class _EndedPort:
    def __init__(self, end: float | None) -> None:
        self.end = end

    def sensors_end(self) -> float | None:
        return self.end


def test_paced_text_stops_waiting_for_a_caption_a_hop_past_the_ended_streams_with_one_warning(tmp_path, caplog) -> None:
    import logging

    from pipeline.align import AlignConfig
    from pipeline.reader import StreamReader
    from sources.replay import ReplayPacer
    from sources.session import StreamSpec

    spec = StreamSpec(id="captions", modality="text", source=tmp_path / "captions.jsonl", session="s1", root=tmp_path)
    reader = StreamReader("s1", spec, {"align": AlignConfig(hop=1.0)})
    reader._port = _EndedPort(None)
    assert not reader._beyond_sensors(100000.0)  # the other streams still run
    reader._port = _EndedPort(2.9)
    assert not reader._beyond_sensors(3.8)  # within a hop of their end: waited for
    now = [100.0]
    pacer = ReplayPacer(1.0, 0.5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s),
                        stop_waiting=reader._beyond_sensors)
    pacer.anchor(Chunk("captions", "text", np.array([0.5]), ["first"]))
    with caplog.at_level(logging.WARNING, logger="pipeline.reader"):
        for t in (100000.0, 100001.0):
            assert list(pacer.wait(Chunk("captions", "text", np.array([t]), ["far"]), lambda: 0.5)) == []
    assert now[0] == 100.0 and pacer.unpaced_from == 100000.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for part in ("session 's1'", "stream 'captions'", "captions.jsonl", "t=100000.000 s", "t=2.900 s", "time_unit"):
        assert part in warnings[0], (part, warnings[0])
