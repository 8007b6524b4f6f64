"""Slow and dead consumers of a LIVE run, and publisher restarts with several sessions.

Real peers (ZeroMQ IMU publishers from ``live_peers.py``), real Ray actors, real SUB sockets on
127.0.0.1, real processes killed with SIGKILL, the tiny model (seeded weights). What is
asserted is what a subscriber (or the operator reading the run's summary) sees:

* a stalled subscriber never stalls a live run: the healthy one keeps receiving every message
  with bounded latency and gets ``end``; the stalled one's losses are counted (heartbeats,
  ``end``, the run's publisher stats and summary) and, once it reads again, visible as ``seq``
  gaps;
* a publisher killed mid-run (two live sessions, or two replay sessions) comes back on the same
  endpoint, every session resumes with ``seq`` never reused, every session gets ``end``, exit 0,
  and whatever a subscriber lost is visible (a ``seq`` gap) or counted.
"""

from __future__ import annotations

import collections
import io
import os
import signal
import threading
import time
from contextlib import redirect_stdout
from typing import Any

import pytest
import zmq

from live_peers import ImuPublisher, free_port
from pipeline.config import parse_config
from sources.demo import write_demo_session
from sinks.protocol import Message, decode

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py

_MODEL = {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1}


def _live_imu_session(name: str, port: int, streams: int = 1) -> dict[str, Any]:
    """A live session of ``streams`` IMU streams, all reading the one ZeroMQ peer on ``port``:
    several streams of one modality put several messages per window on ``emb/<name>/imu``."""
    return {"name": name, "streams": [
        {"id": f"imu{i}", "modality": "imu", "kind": "zmq", "endpoint": f"tcp://127.0.0.1:{port}", "clock": "device"}
        for i in range(streams)]}


def _cfg(sessions: list[Any], **over: Any):
    data: dict[str, Any] = {
        "sessions": sessions,
        "replay": {"rate": 0, "chunk_seconds": 0.25},
        "window": {"hop": 0.25, "spans": {"imu": {"span": 0.5}}},
        "model": dict(_MODEL),
        "encoders": {"replicas": 1, "max_batch": 16, "max_wait_ms": 5},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 60,
                    "heartbeat_s": 0.5},
        "progress": False,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return parse_config(data)


def _run_then_join(run: Any, cfg: Any, on_ready: Any, threads: list[threading.Thread],
                   run_over: threading.Event) -> Any:
    """``run(cfg)``; then, even if it raised, tell the controller threads the run is over (so a
    late SIGINT cannot hit the next test) and wait for them."""
    try:
        return run(cfg, on_ready=on_ready)
    finally:
        run_over.set()
        for th in threads:
            th.join(60)


class _Reader:
    """A real SUB socket read in a thread, each message stamped with its arrival time.

    ``paused`` set: the thread does not read (the socket's queues fill up, as with a consumer
    stuck in its own work); cleared: it reads again. Reads until every session sent ``end``.
    ``rcvhwm``/``rcvbuf`` shrink the subscriber-side queues so a stall fills them quickly.
    """

    def __init__(self, sessions: int, *, paused: bool = False, rcvhwm: int | None = None,
                 rcvbuf: int | None = None) -> None:
        self.sessions = sessions
        self.received: list[tuple[float, Message]] = []
        self.paused = threading.Event()
        if paused:
            self.paused.set()
        self.rcvhwm, self.rcvbuf = rcvhwm, rcvbuf
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_message: Any = None  # called with each message, in the reader thread

    @property
    def messages(self) -> list[Message]:
        return [m for _, m in list(self.received)]

    def start(self, endpoint: str) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, ready), daemon=True)
        self._thread.start()
        assert ready.wait(10), "subscriber socket not connected"

    def _run(self, endpoint: str, ready: threading.Event) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        if self.rcvhwm is not None:
            sock.rcvhwm = self.rcvhwm
        if self.rcvbuf is not None:
            sock.setsockopt(zmq.RCVBUF, self.rcvbuf)  # before connect: sizes the TCP window
        sock.connect(endpoint)
        sock.subscribe(b"")
        ready.set()
        ends = 0
        deadline = time.monotonic() + 300
        try:
            while ends < self.sessions and time.monotonic() < deadline:
                if self.paused.is_set():
                    time.sleep(0.02)
                    continue
                if not sock.poll(100):
                    continue
                msg = decode(sock.recv_multipart())
                self.received.append((time.time(), msg))
                if self.on_message is not None:
                    self.on_message(msg)
                if msg.kind == "control" and msg.event == "end":
                    ends += 1
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            sock.close(linger=0)
            self.done.set()

    def join(self, timeout_s: float = 60.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"subscriber never saw all {self.sessions} session end(s)"
        if self.error:
            raise self.error


def _by_topic(messages: list[Message]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = collections.defaultdict(list)
    for m in messages:
        out[m.topic].append(m)
    return out


def _gaps(seqs: list[int]) -> int:
    """Messages a subscriber can tell it missed between the first and last it received."""
    return sum(b - a - 1 for a, b in zip(seqs, seqs[1:]) if b > a + 1)


def _ends(messages: list[Message]) -> dict[str, dict[str, Any]]:
    return {m.payload["session"]: m.payload for m in messages if m.kind == "control" and m.event == "end"}


def _summary_text(result) -> str:
    from pipeline.__main__ import _print_summary

    out = io.StringIO()
    with redirect_stdout(out):
        _print_summary(result)
    return out.getvalue()


# -- 1. a stalled subscriber in a live run ------------------------------------------------------
def test_live_publisher_keeps_serving_a_reading_subscriber_while_another_one_is_stalled():
    """libzmq's XPUB_NODROP refuses a message for every subscriber when one queue is full; the
    live publisher must send it on to the subscribers that have room and count the drop."""
    import numpy as np

    from sinks.protocol import EmbeddingRecord
    from sinks import Publisher

    n, dim = 600, 32
    ctx = zmq.Context()
    try:
        with Publisher("tcp://127.0.0.1:*", mode="live", hwm=100, sndbuf=4096, wait_for_subscribers=2,
                       wait_timeout_s=10, control_timeout_s=0.5) as pub:
            stalled = ctx.socket(zmq.SUB)
            stalled.linger, stalled.rcvhwm = 0, 1
            stalled.setsockopt(zmq.RCVBUF, 1024)
            stalled.subscribe(b"")
            stalled.connect(pub.bound_endpoint)
            healthy = _Reader(1)
            healthy.start(pub.bound_endpoint)
            pub.start_session("s1", {"cam0": "vision"}, dim=dim)
            emb = np.full(dim, 1 / np.sqrt(dim), np.float32)
            t0 = time.monotonic()
            for w in range(n):
                pub.publish([EmbeddingRecord("s1", "cam0", "vision", w, float(w), w + 1.0, emb, time.time())])
                if w % 100 == 0:
                    pub.heartbeat("s1", {"windows": w})
                # Paced like a live run: the reading subscriber stays well within its queue of 100
                # (libzmq's writer sees reads in steps of half the hwm).
                while len(healthy.received) < w - 20 and time.monotonic() - t0 < 60:
                    time.sleep(0.0005)
            pub.end_session("s1", windows=n)
            dropped = pub.stats()["dropped"]
            healthy.join(30)
            # The stalled subscriber reads again: it sees where it lost messages.
            late = []
            while stalled.poll(1000):
                late.append(decode(stalled.recv_multipart()))
            stalled.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    got = _by_topic(healthy.messages)
    assert [m.seq for m in got["emb/s1/vision"]] == list(range(n)), "the reading subscriber lost messages"
    assert [m.event for m in got["ctl/s1"]] == ["start"] + ["heartbeat"] * 6 + ["end"]
    assert dropped.get("emb/s1/vision", 0) > 0, dropped
    end = got["ctl/s1"][-1].payload
    assert end["dropped"]["hwm"] >= dropped["emb/s1/vision"]
    seqs = [m.seq for m in late if m.topic == "emb/s1/vision"]
    assert seqs and _gaps(seqs + [n]) > 0  # whatever it got, the seqs it missed show


def test_live_stalled_subscriber_never_stalls_the_run_and_its_losses_are_counted_and_seen_as_seq_gaps():
    from pipeline.run import run

    port = free_port()
    imu = ImuPublisher(port, time.time(), rate=200, jitter_s=0.0, batch=5)
    imu.start()
    bound = 2.0
    # Four IMU streams at a 0.1 s hop: ~40 embeddings/s on one topic. The stalled subscriber's
    # queues are small (publish.hwm 100, a 4 KiB OS send buffer, its own rcvhwm 1 and a 1 KiB
    # TCP window: ~100 small messages in all), so they fill within seconds even when a loaded
    # machine publishes less; a reading subscriber stays far below the hwm. stop_after is only
    # a safety net: the test stops the run itself, as Ctrl-C would.
    cfg = _cfg([_live_imu_session("rig-a", port, streams=4)], stop_after=120.0,
               window={"hop": 0.1}, publish={"hwm": 100, "sndbuf": 4096, "wait_for_subscribers": 2},
               live={"max_latency_s": bound})
    healthy = _Reader(1)
    stalled = _Reader(1, paused=True, rcvhwm=1, rcvbuf=1024)
    topic = "emb/rig-a/imu"
    state: dict[str, Any] = {"error": None, "sigint_at": None}
    run_over = threading.Event()
    threads: list[threading.Thread] = []

    def hwm_drops_seen(reader: _Reader) -> int:
        return max((m.payload.get("dropped", {}).get("hwm", 0) for m in reader.messages
                    if m.kind == "control" and m.event == "heartbeat"), default=0)

    def wait_for(cond, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def controller() -> None:
        try:
            # The stalled subscriber's queues are full once heartbeats count hwm drops ...
            wait_for(lambda: hwm_drops_seen(healthy) > 0, "hwm drops in a heartbeat")
            n = sum(m.topic == topic for m in healthy.messages)
            # ... and the healthy one keeps receiving embeddings after that.
            wait_for(lambda: sum(m.topic == topic for m in healthy.messages) >= n + 40, "embeddings after the drops")
            state["healthy_at_resume"] = len(healthy.received)
            stalled.paused.clear()  # the stalled consumer reads again
            wait_for(lambda: _gaps([m.seq for m in stalled.messages if m.topic == topic]) > 0,
                     "the resumed subscriber to receive past a seq gap")
        except BaseException as exc:
            state["error"] = exc
        finally:
            stalled.paused.clear()
            state["sigint_at"] = time.monotonic()
            if not run_over.is_set():  # a late signal would interrupt the next test instead
                os.kill(os.getpid(), signal.SIGINT)  # run()'s handler: stop the sources, drain, end

    def on_ready(endpoint: str) -> None:
        healthy.start(endpoint)
        stalled.start(endpoint)
        threads.append(threading.Thread(target=controller, daemon=True))
        threads[-1].start()

    try:
        result = _run_then_join(run, cfg, on_ready, threads, run_over)
        stopped_in = time.monotonic() - state["sigint_at"]
        healthy.join()
        stalled.join()
    finally:
        imu.halt.set()
    if state["error"]:
        raise state["error"]
    assert result.elapsed_s < 110, "the run went on to stop_after instead of stopping when told"
    assert stopped_in < 30, f"the live run took {stopped_in:.1f} s to end after Ctrl-C"
    assert result.exit_code == 0, result.sessions

    # The healthy subscriber got every embedding the aligner published, seq contiguous from 0,
    # with bounded latency, and the end: the stalled one cost it nothing.
    end = _ends(healthy.messages)["rig-a"]
    got = _by_topic(healthy.messages)
    seqs = [m.seq for m in got[topic]]
    assert seqs == list(range(len(seqs))), f"the healthy subscriber lost messages: {_gaps(seqs)} missing"
    assert len(seqs) == end["counts"]["imu"] == result.sessions[0]["counts"]["imu"]
    assert [m.seq for m in got["ctl/rig-a"]] == list(range(len(got["ctl/rig-a"])))
    lat = [t - m.payload["t_publish"] + m.payload["latency_s"] for t, m in healthy.received if m.topic == topic]
    assert max(lat) <= bound + 1.0, f"healthy subscriber latency {max(lat):.2f} s, bound {bound} s"

    # The drops are counted, with their cause, in every place the docs name.
    # The first refused message may be a heartbeat rather than an embedding (libzmq then skips
    # the full subscriber silently), so the count is per topic, whichever topic it fell on.
    pub = result.publisher_stats
    emb_drops, ctl_drops = pub["dropped"].get(topic, 0), pub["dropped"].get("ctl/rig-a", 0)
    assert emb_drops + ctl_drops > 0, pub["dropped"]
    # end counts the session's topics up to itself (a dropped end would add one on ctl/rig-a).
    assert emb_drops <= end["dropped"]["hwm"] <= emb_drops + ctl_drops
    summary = _summary_text(result)
    assert "publisher dropped (hwm): " in summary
    assert all(f"{t} {n}" in summary for t, n in pub["dropped"].items() if n), summary

    # The stalled subscriber, reading again, sees its loss as seq gaps. The publisher's count
    # is a lower bound of it (docs/protocol.md: libzmq skips a full subscriber silently after
    # the first refused message), so the two are not compared.
    s_emb = [m.seq for m in stalled.messages if m.topic == topic]
    assert s_emb == sorted(set(s_emb))
    assert _gaps(s_emb) > 0 and len(s_emb) < len(seqs)
    assert _ends(stalled.messages)["rig-a"]["dropped"]["hwm"] == end["dropped"]["hwm"]


# -- 2. publisher killed mid-run, several sessions sharing it -----------------------------------
def _kill_publisher_midway(messages_so_far: Any, sessions: list[str], state: dict[str, Any],
                           stop_live: bool, run_over: threading.Event) -> None:
    """Once every session has embeddings at the subscriber, SIGKILL the publisher's process;
    then (live) wait until every session has embeddings from the restarted one, and stop."""
    from test_faults import _find_actor

    def emb_of(s: str) -> int:
        return sum(1 for m in messages_so_far() if m.topic.startswith(f"emb/{s}/"))

    try:
        deadline = time.monotonic() + 120
        while any(emb_of(s) < 3 for s in sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        pub = _find_actor("bindstream.publisher.")
        state["pid_before"] = ray.get(pub.pid.remote())
        state["endpoint_before"] = ray.get(pub.endpoint.remote())
        state["before"] = {s: emb_of(s) for s in sessions}
        os.kill(state["pid_before"], signal.SIGKILL)
        state["mid_run"] = not any(m.kind == "control" and m.event == "end" for m in messages_so_far())
        if stop_live:
            deadline = time.monotonic() + 120
            while any(emb_of(s) < state["before"][s] + 3 for s in sessions) and time.monotonic() < deadline:
                time.sleep(0.05)
    except BaseException as exc:  # surfaced by the test
        state["error"] = exc
    finally:
        if stop_live and not run_over.is_set():  # a late signal would interrupt the next test instead
            os.kill(os.getpid(), signal.SIGINT)  # run()'s handler: stop the sources, drain, end


def _assert_restarted_on_the_same_endpoint(result, state: dict[str, Any], sessions: list[str],
                                           messages: list[Message]) -> None:
    if state.get("error"):
        raise state["error"]
    assert state["mid_run"], "the run ended before the publisher was killed; the test proved nothing"
    pub = result.publisher_stats  # collected at the end of the run: the new incarnation's
    assert pub["restarted"] and pub["pid"] != state["pid_before"], "the publisher was not restarted"
    assert pub["endpoint"] == state["endpoint_before"] == result.endpoint, "the restart bound another endpoint"
    assert result.exit_code == 0, [s["errors"] for s in result.sessions]
    assert {s["session"] for s in result.sessions} == set(sessions)
    assert all(s["publisher_restarts"] >= 1 for s in result.sessions), "a session did not resume the publisher"
    assert set(_ends(messages)) == set(sessions), "a session got no end"
    # No seq is ever reused: strictly increasing on every topic of every session (the start
    # repeated for a subscriber as it reconnects has no seq: docs/protocol.md).
    for topic, msgs in _by_topic(messages).items():
        seqs = [m.seq for m in msgs if m.seq is not None]
        assert all(b > a for a, b in zip(seqs, seqs[1:])), f"{topic}: seq reused or out of order: {seqs}"
    for s in sessions:
        after = sum(1 for m in messages if m.topic.startswith(f"emb/{s}/")) - state["before"][s]
        assert after > 0, f"session '{s}': nothing received after the restart"


def test_live_publisher_killed_with_two_live_sessions_restarts_and_every_loss_is_a_seq_gap_or_counted():
    from pipeline.run import run

    ports = [free_port(), free_port()]
    peers = [ImuPublisher(p, time.time(), rate=100, jitter_s=0.0, batch=5) for p in ports]
    for peer in peers:
        peer.start()
    sessions = ["rig-a", "rig-b"]
    cfg = _cfg([_live_imu_session(s, p) for s, p in zip(sessions, ports)], stop_after=150.0)
    reader = _Reader(len(sessions))
    state: dict[str, Any] = {}
    run_over = threading.Event()
    threads: list[threading.Thread] = []

    def on_ready(endpoint: str) -> None:
        reader.start(endpoint)
        threads.append(threading.Thread(target=_kill_publisher_midway, daemon=True,
                                        args=(lambda: reader.messages, sessions, state, True, run_over)))
        threads[-1].start()

    try:
        result = _run_then_join(run, cfg, on_ready, threads, run_over)
        reader.join()
    finally:
        for peer in peers:
            peer.halt.set()
    messages = reader.messages
    _assert_restarted_on_the_same_endpoint(result, state, sessions, messages)
    assert result.elapsed_s < 140, "the run went on to stop_after instead of stopping when told"
    # docs/guarantees.md, live: a window the subscriber misses is either a seq gap (lost in the
    # dead process's queue, or published before the subscriber reconnected) or counted as
    # dropped by the aligner (shed for latency while the publisher was away).
    ends = _ends(messages)
    for s in sessions:
        msgs = [m for m in messages if m.topic == f"emb/{s}/imu"]
        windows, seqs = [m.payload["window"] for m in msgs], [m.seq for m in msgs]
        missing = set(range(windows[0], max(windows) + 1)) - set(windows)
        counted = sum(n for k, n in ends[s]["dropped"].items() if k.startswith("imu0:"))
        assert len(missing) <= _gaps(seqs) + counted, (
            f"session '{s}': windows {sorted(missing)} missing with {_gaps(seqs)} seq gap(s) and {counted} counted")


def test_replay_publisher_killed_with_two_sessions_resumes_each_without_seq_reuse(tmp_path):
    from pipeline.run import run
    from test_faults import _split_at_restart
    from test_pipeline_e2e import _config, _expected_windows

    # Real-time replay of 5 s sessions: both are still running when the first embeddings of
    # each have arrived, so the kill lands in the middle of both.
    dirs = [write_demo_session(tmp_path / n, seconds=5.0, seed=i, name=n) for i, n in enumerate(["rep-a", "rep-b"])]
    sessions = ["rep-a", "rep-b"]
    cfg = _config(dirs, replay={"rate": 1.0}, publish={"wait_for_subscribers": 1})
    reader = _Reader(len(sessions))
    state: dict[str, Any] = {}
    threads: list[threading.Thread] = []

    def on_ready(endpoint: str) -> None:
        reader.start(endpoint)
        threads.append(threading.Thread(target=_kill_publisher_midway,
                                        args=(lambda: reader.messages, sessions, state, False, threading.Event()),
                                        daemon=True))
        threads[-1].start()

    result = run(cfg, on_ready=on_ready)
    reader.join()
    for th in threads:
        th.join(60)
    messages = reader.messages
    _assert_restarted_on_the_same_endpoint(result, state, sessions, messages)
    # docs/guarantees.md, replay across a publisher restart: per session and topic, everything
    # published after the restart arrives once, in order; what the dead process had not
    # delivered is a seq gap (no more windows lost than seqs skipped); the re-sent batch may
    # repeat windows (new seqs), which a subscriber removes on (session, stream, window).
    topics = _by_topic(messages)
    for d in dirs:
        spec, windows = _expected_windows(d, cfg)
        for modality in {it.modality for w in windows for it in w.items}:
            want = sorted({it.window for w in windows for it in w.items if it.modality == modality})
            msgs = topics[f"emb/{spec.name}/{modality}"]
            seqs, got = [m.seq for m in msgs], [m.payload["window"] for m in msgs]
            g = _split_at_restart(seqs, got)
            if g is None:
                assert got == want, f"{spec.name}/{modality}: windows lost or repeated without a seq gap"
                continue
            before, resumed = got[:g], got[g:]
            assert _split_at_restart(seqs[g:], resumed) is None, f"{spec.name}/{modality}: two breaks: {seqs}"
            assert resumed == [w for w in want if w >= resumed[0]], f"{spec.name}/{modality}: lost after the restart"
            lost = [w for w in want if w < resumed[0] and w not in before]
            assert len(lost) <= seqs[g] - seqs[g - 1] - 1, f"{spec.name}/{modality}: {lost} lost without a seq gap"
