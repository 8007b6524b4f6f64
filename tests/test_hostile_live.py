"""Hostile live input through the real graph: real ZeroMQ and imagezmq peers on 127.0.0.1
(tests/live_peers.py), real Ray actors, the tiny model. Each test replays an attack that was
found on the pipeline and asserts what the operator sees: the exit code, the counted drops,
the windows, the time the run takes to stop, and where memory is the point, the peak RSS of
the session's process. The policies themselves are tested with fake clocks in
tests/test_hostile_input.py."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from live_peers import ImuPublisher, free_port
from pipeline.config import parse_config
from procs import descendants as _descendants, rss as _rss

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py

_MODEL = {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1}
HOP = 0.25
# A session process (aligner, readers, Ray worker, numpy, PyAV, pyzmq) holds about 250 MiB with
# nothing flowing; the margin covers what a budget does not: the open chunk, the chunks in
# flight to the aligner, the frames the aligner holds for its windows and libzmq's short queue.
_IDLE_SESSION_RSS = 300 << 20
_MARGIN = 300 << 20


def _cfg(streams: list[dict[str, Any]], **over: Any):
    data: dict[str, Any] = {
        "sessions": [{"name": "rig", "streams": streams}],
        "replay": {"rate": 0, "chunk_seconds": 0.25},
        "window": {"hop": HOP, "spans": {"imu": {"span": 0.5}}},
        "model": dict(_MODEL),
        "encoders": {"replicas": 1, "max_batch": 16, "max_wait_ms": 5},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.5},
        "progress": False,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return parse_config(data)


def _imu_stream(port: int, clock: str, sid: str = "imu") -> dict[str, Any]:
    return {"id": sid, "modality": "imu", "kind": "zmq", "endpoint": f"tcp://127.0.0.1:{port}", "clock": clock}


class PeakRss(threading.Thread):
    """Samples the RSS of every descendant of this (the driver's) process through /proc, every
    ``every_s``: ``peak[pid]`` is each one's largest, in bytes. Ray's raylet is a child of the
    driver started by ``ray.init`` and the actors are its children, so the session's process
    (its aligner and its readers) is among them."""

    def __init__(self, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.peak: dict[int, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            for pid in _descendants(os.getpid()):
                rss = _rss(pid)
                if rss > self.peak.get(pid, 0):
                    self.peak[pid] = rss


@pytest.mark.parametrize("clock", ["session", "device"])
def test_wild_timestamps_on_a_live_stream_are_dropped_and_the_run_stops_on_time(clock):
    """One sample 1e6 s ahead, one 1e9 s behind, one 1e9 s ahead, on a live IMU stream at
    100 Hz: each is dropped and counted as ``imu:jump``; the stream goes on (no ``late`` flood,
    no million empty windows), ``stop_after`` ends the run on time and the summary comes."""
    from pipeline.run import run

    port = free_port()
    epoch = time.time()
    # clock: session wants Unix time stamps: device time 0 + Unix time with no skew.
    dev0, skew = (epoch, 0.0) if clock == "session" else (5000.0, 300e-6)
    imu = ImuPublisher(port, epoch, rate=100, jitter_s=0.001, dev0=dev0, skew=skew)
    # A wild sample every 1.5 s (the run starts reading a few seconds after the publisher).
    imu.wild = [(2.0 + 1.5 * i, (1e6, -1e9, 1e9)[i % 3]) for i in range(40)]
    stop_after = 8.0
    try:
        result = run(_cfg([_imu_stream(port, clock)], stop_after=stop_after), on_ready=lambda _: imu.start())
    finally:
        imu.halt.set()
        imu.join(10)
    s = result.sessions[0]
    assert result.exit_code == 0, s["errors"]
    assert result.elapsed_s < stop_after + 30, f"stop_after={stop_after} s, the run took {result.elapsed_s:.1f} s"
    assert s["dropped"].get("imu:jump", 0) >= 3, s["dropped"]
    stats = next(x for x in result.source_stats if x["stream"] == "imu")
    assert s["dropped"].get("imu:late", 0) < 0.05 * stats["samples"], s["dropped"]
    assert s["windows"] <= (result.elapsed_s + 5) / HOP, s["windows"]
    # the stream kept flowing after the wild samples: most windows carry an IMU embedding
    assert s["counts"].get("imu", 0) >= 0.6 * (stop_after - 1) / HOP, (s["counts"], s["windows"])


# -- 2. live zmq input has a byte budget ------------------------------------------------------
def test_a_flood_of_large_frames_at_ten_times_the_budget_keeps_memory_bounded_and_is_counted():
    """8 MB depth frames at 40 a second (320 MB/s: twenty times the stream's 16 MiB budget a
    second) next to a clean IMU stream. The depth stream drops what does not fit as
    ``over_budget``; the peak RSS of the session's process stays within its idle size plus
    the budget and a stated margin; the IMU stream completes."""
    import numpy as np

    from live_peers import FramePublisher
    from pipeline.run import run

    budget = 16 << 20
    imu_port, depth_port = free_port(), free_port()
    epoch = time.time()
    imu = ImuPublisher(imu_port, epoch, rate=100, jitter_s=0.001)
    frame = (np.arange(2048 * 2048, dtype=np.uint32) % 5000).astype(np.uint16).reshape(2048, 2048)
    flood = FramePublisher(depth_port, epoch, [frame], fps=40)
    streams = [_imu_stream(imu_port, "device"),
               {"id": "depth", "modality": "depth", "kind": "zmq", "endpoint": f"tcp://127.0.0.1:{depth_port}",
                "queue_bytes": budget}]
    rss = PeakRss()
    rss.start()
    stop_after = 10.0

    def start_peers(_: str) -> None:
        imu.start()
        flood.start()

    try:
        result = run(_cfg(streams, stop_after=stop_after), on_ready=start_peers)
    finally:
        imu.halt.set()
        flood.halt.set()
        rss.halt.set()
        imu.join(10)
        flood.join(10)
        rss.join(10)
    s = result.sessions[0]
    assert result.exit_code == 0, s["errors"]
    session_pid = next(x["pid"] for x in result.source_stats if x["stream"] == "depth")
    peak = rss.peak[session_pid]
    print(f"flood: sent {flood.sent} frames ({flood.sent_bytes / 2**20:.0f} MiB), dropped {s['dropped']}, "
          f"session process peak RSS {peak / 2**20:.0f} MiB")
    # What did not fit is counted: refused at the inbox (over_budget) or, once buffered, left
    # out as no window could pick it (thinned); which of the two depends on how fast the
    # session drains its inbox on this machine at the moment.
    assert s["dropped"].get("depth:over_budget", 0) + s["dropped"].get("depth:thinned", 0) > 0, s["dropped"]
    assert peak < _IDLE_SESSION_RSS + budget + _MARGIN, f"peak RSS {peak / 2**20:.0f} MiB"
    assert s["counts"].get("imu", 0) >= 0.6 * (stop_after - 1) / HOP, s["counts"]
    assert s["counts"].get("depth", 0) > 0, s["counts"]


# -- 3 and 4. messages over max_bytes; frames that change size -----------------------------------
def test_oversized_messages_are_counted_and_frames_of_two_sizes_neither_kill_the_stream_nor_hang_senders():
    """A real imagezmq REQ sender alternating 320x240 and 640x360 frames, and a ``kind: zmq``
    depth camera with ``max_bytes`` 1 MiB sending 0.5 MiB frames, 1.5 MiB ones (dropped and
    counted as ``too_big``) and 3 MiB ones (refused by libzmq, counted as ``disconnect``). The
    vision stream completes with every frame at its first size, every request was answered,
    and the run exits 0."""
    import numpy as np

    from live_peers import FramePublisher, ImageZmqFeeder, real_frames

    from pipeline.run import run

    small = real_frames(6)
    big = [np.ascontiguousarray(np.repeat(np.repeat(f, 2, axis=0), 2, axis=1)[:360]) for f in small]
    cam_port, depth_port = free_port(), free_port()
    feeder = ImageZmqFeeder(f"tcp://127.0.0.1:{cam_port}", [x for pair in zip(small, big) for x in pair],
                            reqrep=True, fps=10)
    depth_frames = [np.zeros((512, 512), np.uint16), np.zeros((768, 1024), np.uint16),
                    np.zeros((1024, 1536), np.uint16)]  # 0.5, 1.5 and 3 MiB
    depth = FramePublisher(depth_port, time.time(), depth_frames, fps=9)
    streams = [{"id": "cam", "modality": "vision", "kind": "imagezmq", "endpoint": f"tcp://127.0.0.1:{cam_port}"},
               {"id": "depth", "modality": "depth", "kind": "zmq", "endpoint": f"tcp://127.0.0.1:{depth_port}",
                "max_bytes": 1 << 20}]

    def start_peers(_: str) -> None:
        feeder.start()
        depth.start()

    try:
        result = run(_cfg(streams, stop_after=8.0), on_ready=start_peers)
    finally:
        feeder.halt.set()
        depth.halt.set()
        feeder.join(10)
        depth.join(10)
    s = result.sessions[0]
    assert result.exit_code == 0, s["errors"]
    assert s["dropped"].get("depth:too_big", 0) > 0, s["dropped"]
    assert s["dropped"].get("depth:disconnect", 0) > 0, s["dropped"]
    assert s["counts"].get("depth", 0) > 0 and s["counts"].get("vision", 0) > 0, (s["counts"], s["dropped"], s["missing"])
    sent_both = {i % 2 for i in feeder.sent}
    assert sent_both == {0, 1}, "the sender never sent both sizes"
    assert len(feeder.replies) == len(feeder.sent) and set(feeder.replies) == {b"OK"}
