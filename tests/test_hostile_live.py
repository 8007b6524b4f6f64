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

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py

_MODEL = {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1}
HOP = 0.25


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


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- 1. the clock guard cannot be walked away ---------------------------------------------------
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
