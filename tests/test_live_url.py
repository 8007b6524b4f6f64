"""``kind: url`` against a real RTSP peer: timestamps from RTCP sender reports, live audio
through the full Ray graph (recorded and replayed), and audio across a reconnect.

The peer is a PyAV RTSP muxer (RTP + RTCP sender reports) pushing the video or the soundtrack of
realshort.mp4 to our receiver, which listens (FFmpeg's RTSP demuxer with ``rtsp_flags:
listen``). The sender runs in its own process: PyAV holds the GIL while the muxer waits for the
RTSP handshake, which would starve the receiver's interrupt callback in the same process.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from live_peers import REAL_VIDEO, free_port
from sources.clock import SessionClock
from sources.session import session_from_dict
from sources.live import open_live_source

needs_video = pytest.mark.skipif(not REAL_VIDEO.exists(), reason=f"{REAL_VIDEO} is absent")


# -- the peer ---------------------------------------------------------------------------------------
def _rtsp_sender(url: str, modality: str, segments: list[tuple[float, float]], claim_offset_s: float,
                 report: Any) -> None:
    """Push realshort.mp4's video (15 fps) or sound (AAC, 48 kHz), looped and paced in real
    time, to ``url`` for each ``(seconds, pause_after)`` segment, reconnecting in between.
    ``claim_offset_s``: the muxer's ``start_time_realtime`` is set that far from the wall
    clock, so its RTCP sender reports claim times off by it. Reports ``(segment, "start" or
    "end", unix time)`` when a segment starts sending (after the RTSP handshake) and ends."""
    import av

    with av.open(str(REAL_VIDEO)) as c:
        if modality == "audio":
            rs = av.AudioResampler(format="fltp", layout="mono", rate=48000, frame_size=1024)
            media = [f for fr in c.decode(audio=0) for f in rs.resample(fr)]
        else:
            media = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for k, (seconds, pause) in enumerate(segments):
        deadline = time.time() + 150  # the receiver (a Ray actor under load) can take a while to listen
        while True:  # the receiver may not be listening yet (or again): retry
            opts = {"rtsp_transport": "tcp"}
            if claim_offset_s:
                opts["start_time_realtime"] = str(int((time.time() + claim_offset_s) * 1e6))
            out = av.open(url, "w", format="rtsp", options=opts)
            if modality == "audio":
                s = out.add_stream("aac", rate=48000)
                s.layout = "mono"
                step = 1024 / 48000
            else:
                s = out.add_stream("mpeg4", rate=15)
                s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
                s.codec_context.gop_size = 5
                step = 1 / 15
            try:
                out.start_encoding()
                break
            except (av.FFmpegError, OSError):
                out.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        t0 = time.time()
        report.put((k, "start", t0))
        i = 0
        while time.time() - t0 < seconds:
            if modality == "audio":
                src = media[i % len(media)]
                frame = av.AudioFrame.from_ndarray(src.to_ndarray(), format="fltp", layout="mono")
                frame.sample_rate = 48000
                frame.pts = i * 1024
                frame.time_base = Fraction(1, 48000)
            else:
                frame = av.VideoFrame.from_ndarray(media[i % len(media)], format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, 15)
            for p in s.encode(frame):
                out.mux(p)
            i += 1
            time.sleep(max(0.0, t0 + i * step - time.time()))
        out.close()
        report.put((k, "end", time.time()))
        time.sleep(pause)


class _Sender:
    """:func:`_rtsp_sender` in a spawned process."""

    def __init__(self, url: str, modality: str, segments: list[tuple[float, float]], claim_offset_s: float = 0.0):
        ctx = multiprocessing.get_context("spawn")
        self.report = ctx.Queue()
        self.proc = ctx.Process(target=_rtsp_sender, args=(url, modality, segments, claim_offset_s, self.report),
                                daemon=True)
        self.segments: dict[int, dict[str, float]] = {}

    def start(self) -> "_Sender":
        self.proc.start()
        return self

    def poll(self) -> dict[int, dict[str, float]]:
        """``{segment: {"start": unix time, "end": unix time}}`` as far as reported."""
        while not self.report.empty():
            k, what, t = self.report.get()
            self.segments.setdefault(k, {})[what] = t
        return self.segments

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)


def _listen_spec(tmp_path, modality: str, port: int, **extra: Any):
    doc = {"name": "rig", "streams": [{"id": "s", "modality": modality, "kind": "url",
                                        "url": f"rtsp://127.0.0.1:{port}/live", "timeout_s": 3, "max_backoff_s": 0.5,
                                        "options": {"rtsp_flags": "listen"}, **extra}]}
    return session_from_dict(doc, tmp_path).streams[0]


def _drive(source, until, timeout: float = 60.0) -> list:
    """Iterate ``source`` in a thread until ``until(chunks)`` holds (or ``timeout``), then stop it."""
    chunks: list = []
    th = threading.Thread(target=lambda: chunks.extend(source), daemon=True)
    th.start()
    deadline = time.time() + timeout
    while time.time() < deadline and not until(chunks):
        time.sleep(0.05)
    source.stop()
    th.join(15)
    assert not th.is_alive(), "live source did not end after stop()"
    return chunks


# -- 1. RTCP sender reports -------------------------------------------------------------------------
@needs_video
def test_rtsp_video_times_come_from_the_senders_rtcp_reports_not_from_arrival(tmp_path):
    """The sender's RTCP reports claim a wall clock 30 s ahead: the frames land 30 s after
    their arrival on the session clock, spaced exactly by their pts."""
    port, claim = free_port(), 30.0
    clock = SessionClock()
    src = open_live_source(_listen_spec(tmp_path, "vision", port), clock, chunk_seconds=0.2)
    sender = _Sender(f"rtsp://127.0.0.1:{port}/live", "vision", [(60.0, 0.0)], claim_offset_s=claim).start()
    try:
        chunks = _drive(src, lambda cs: sum(len(c) for c in cs) >= 25)
    finally:
        sender.stop()
    start = sender.poll()[0]["start"]
    t = np.concatenate([c.t for c in chunks])
    assert len(t) >= 25 and chunks[0].data.shape[1:] == (224, 298, 3)
    assert src.clock_mapping == "rtcp"
    # Where the sender says each frame is, relative to when its chunk left the source.
    ahead = np.array([c.t[-1] - (c.t_ingest - clock.epoch) for c in chunks])
    assert np.all(np.abs(ahead - claim) < 1.5), ahead  # arrival-based mapping would give <= 0
    assert abs(t[0] - (start + claim - clock.epoch)) < 1.0, (t[0], start + claim - clock.epoch)
    # pts of a 15 fps stream, not arrival jitter.
    np.testing.assert_allclose(np.diff(t), 1 / 15, atol=2e-3)
    assert len(src.clock.applied) == 2  # the offset applied, for the recording's session.yaml


# -- 3. audio across a reconnect, recorded ----------------------------------------------------------
@needs_video
def test_rtsp_audio_reconnect_is_a_gap_on_the_session_clock_and_the_recording_replays_it(tmp_path):
    from sources.record import StreamRecorder, finish_recording
    from sources.session import load_session
    from sources.replay import open_source

    port = free_port()
    clock = SessionClock()
    src = open_live_source(_listen_spec(tmp_path, "audio", port), clock, chunk_seconds=0.25)
    # 2 s of sound, hang up, 1.5 s silence on the wire, reconnect, 2 s more.
    sender = _Sender(f"rtsp://127.0.0.1:{port}/live", "audio", [(2.0, 1.5), (2.0, 0.0)]).start()
    try:
        # Stopping emits what the source holds, so stop soon after the sender hung up for good.
        chunks = _drive(src, lambda cs: time.time() > sender.poll().get(1, {}).get("end", np.inf) + 1.0)
    finally:
        sender.stop()
    seg = sender.poll()
    assert set(seg) == {0, 1}, "the sender did not get through both connections"
    t = np.concatenate([c.t for c in chunks])
    pcm = np.concatenate([c.data for c in chunks])
    jumps = np.flatnonzero(np.diff(t) > 0.1)
    assert len(jumps) == 1, f"expected one gap, got times jumping at {t[jumps]}"
    j = int(jumps[0]) + 1
    assert 1.5 < t[j - 1] - t[0] + 1 / 16000 < 2.5 and 1.5 < t[-1] - t[j] < 2.5, "each connection carried ~2 s"
    # The gap is the time the sender was away, not zero (a shift) ...
    away = seg[1]["start"] - seg[0]["end"]
    assert abs((t[j] - t[j - 1]) - away) < 0.5, (t[j] - t[j - 1], away)
    # ... and after it the samples are where the sender's clock puts them on the session clock.
    assert abs(t[j] - (seg[1]["start"] - clock.epoch)) < 0.5
    assert src.dropped.get("reconnect", 0) >= 1 and src.clock_mapping == "rtcp"
    grid = (t - t[0]) * 16000
    np.testing.assert_allclose(grid, np.rint(grid), atol=1e-4)  # one 16 kHz sample grid across the gap

    rec = StreamRecorder(tmp_path / "rec", "mic", "audio")
    for c in chunks:
        rec.write(c)
    (spec,) = load_session(finish_recording(tmp_path / "rec", "rig", [rec.close()])).streams
    replay = list(open_source(spec, chunk_seconds=0.5))
    rt = np.concatenate([c.t for c in replay])
    rd = np.concatenate([c.data for c in replay])
    idx = np.rint(grid).astype(np.int64)
    assert len(rt) == idx[-1] + 1
    np.testing.assert_array_equal(rt[idx], t)  # the replay has the live times exactly, after the gap too
    np.testing.assert_array_equal(rd[idx], pcm)
    assert not rd[idx[j - 1] + 1:idx[j]].any(), "the gap replays as silence"


# -- 2. live audio through the full graph, recorded and replayed ------------------------------------
@needs_video
def test_live_rtsp_audio_through_the_graph_is_on_the_session_clock_and_its_recording_replays(
        ray_cluster, tmp_path, caplog):
    import logging
    import os
    import re
    import signal

    from sinks.protocol import decode, embedding_array
    from pipeline.run import run
    from sources.session import load_session
    from test_pipeline_e2e import Subscriber
    from test_record import _cfg

    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/live"
    session = {"name": "rig-a", "streams": [{"id": "mic", "modality": "audio", "kind": "url", "url": url,
                                             "timeout_s": 5, "max_backoff_s": 1, "options": {"rtsp_flags": "listen"}}]}
    cfg = _cfg([session], stop_after=120.0, record=str(tmp_path / "rec"))
    sender = _Sender(url, "audio", [(120.0, 0.0)]).start()
    sub = Subscriber(1)
    stopping: list[bool] = []

    def collect(endpoint, ready):  # Subscriber._run, plus Ctrl-C once 4 audio embeddings are in
        import zmq

        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVTIMEO, 120_000)
        sock.connect(endpoint)
        sock.subscribe(b"")
        ready.set()
        try:
            while True:
                msg = decode(sock.recv_multipart())
                sub.messages.append(msg)
                if sum(m.topic.startswith("emb/") for m in sub.messages) >= 4 and not stopping:
                    stopping.append(True)
                    os.kill(os.getpid(), signal.SIGINT)  # run()'s handler: drain, end, write the recording
                if msg.topic.startswith("ctl/") and msg.payload["event"] == "end":
                    break
        except BaseException as exc:
            sub.error = exc
        finally:
            sock.close(linger=0)

    sub._run = collect
    caplog.set_level(logging.INFO, logger="pipeline.run")
    try:
        result = run(cfg, on_ready=sub.start)
        sub.join()
    finally:
        sender.stop()
    assert result.exit_code == 0 and stopping
    epoch = float(re.search(r"live session clock epoch ([0-9.]+)", caplog.text).group(1))
    start = sender.poll()[0]["start"]
    emb = [m for m in sub.messages if m.topic == "emb/rig-a/audio"]
    assert len(emb) >= 4
    for m in emb:
        p = m.payload
        assert p["stream"] == "mic" and 0 < p["t_end"] - p["t_start"] <= 2.0
        # Sound the sender sent after it connected, and published only after it existed.
        assert epoch + p["t_start"] > start - 0.5, (epoch + p["t_start"], start)
        assert epoch + p["t_end"] < p["t_publish"], (epoch + p["t_end"], p["t_publish"])
    spec = load_session(tmp_path / "rec" / "rig-a")
    assert "from RTCP sender reports" in spec.description
    live = {m.payload["window"]: embedding_array(m) for m in emb}
    again_sub = Subscriber(1)
    replay = run(_cfg([str(tmp_path / "rec" / "rig-a")]), on_ready=again_sub.start)
    again_sub.join()
    again = {m.payload["window"]: embedding_array(m) for m in again_sub.messages if m.topic == "emb/rig-a/audio"}
    assert replay.exit_code == 0 and set(live) <= set(again)
    for w in live:
        np.testing.assert_allclose(again[w], live[w], atol=1e-5, err_msg=f"window {w}")
