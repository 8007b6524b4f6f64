"""Live sources against real local peers (no Ray): ZeroMQ IMU with a skewed, jittered clock,
imagezmq senders in both modes, a UDP/MPEG-TS stream served by PyAV, PyAV input devices."""

from __future__ import annotations

import glob
import threading
import time

import av
import msgpack
import numpy as np
import pytest
import zmq

from live_peers import REAL_VIDEO, ImageZmqFeeder, ImuPublisher, UdpMpegTsServer, free_port, real_frames
from sources.clock import OffsetEstimator, SessionClock
from sources.errors import ConfigError, SourceError
from sources.session import session_from_dict
from sources.base import frame_values
from sources.live import open_live_source

needs_video = pytest.mark.skipif(not REAL_VIDEO.exists(), reason=f"{REAL_VIDEO} is absent")


def _spec(tmp_path, **stream):
    doc = {"name": "rig", "streams": [{"id": "s", **stream}]}
    return session_from_dict(doc, tmp_path).streams[0]


def _collect(source, until, timeout=20.0, errors=None):
    """Iterate ``source`` in a thread until ``until(chunks)`` holds, then stop it; what the
    iteration raised goes to ``errors`` when given."""
    chunks = []

    def run():
        try:
            for c in source:
                chunks.append(c)
        except Exception as exc:
            if errors is None:
                raise
            errors.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    deadline = time.time() + timeout
    while time.time() < deadline and not until(chunks):
        time.sleep(0.05)
    source.stop()
    th.join(10)
    assert not th.is_alive(), "live source did not end after stop()"
    return chunks


# -- config ---------------------------------------------------------------------------------------
def test_live_stream_entries_validate_kind_options_and_reject_unknown_keys(tmp_path):
    s = _spec(tmp_path, modality="imu", kind="zmq", endpoint="tcp://127.0.0.1:5561", clock="device")
    assert s.live == "zmq" and s.kind == "zmq" and s.clock == "device" and s.option("endpoint").endswith("5561")
    s = _spec(tmp_path, modality="vision", kind="imagezmq", endpoint="tcp://127.0.0.1:5560", mode="pubsub")
    assert s.clock == "arrival" and s.option("mode") == "pubsub" and s.option("color") == "bgr"
    s = _spec(tmp_path, modality="audio", kind="url", url="udp://127.0.0.1:5004", options={"fifo_size": 100000})
    assert s.option("options") == (("fifo_size", "100000"),)
    bad = [
        ({"modality": "imu", "kind": "zmq", "endpoint": "tcp://x:1", "source": "a.csv"}, "unknown key 'source'"),
        ({"modality": "imu", "kind": "zmq"}, "key 'endpoint' is missing"),
        ({"modality": "imu", "kind": "webcam"}, "key 'kind'"),
        ({"modality": "audio", "kind": "imagezmq", "endpoint": "tcp://x:1"}, "carries vision"),
        ({"modality": "vision", "kind": "imagezmq", "endpoint": "tcp://x:1", "clock": "device"}, "key 'clock'"),
        ({"modality": "vision", "kind": "device", "format": "v4l2", "device": "/dev/video0", "size": "big"}, "key 'size'"),
        ({"modality": "vision", "kind": "url", "url": "rtsp://x", "timeout_s": -1}, "key 'timeout_s'"),
    ]
    for stream, msg in bad:
        with pytest.raises(ConfigError, match=msg) as e:
            _spec(tmp_path, **stream)
        assert "stream 's'" in str(e.value)
    with pytest.raises(ConfigError, match="mixes live streams"):
        (tmp_path / "a.csv").write_text("t\n")
        session_from_dict({"format": "bindstream.session/1", "name": "x", "streams": [
            {"id": "a", "modality": "imu", "kind": "zmq", "endpoint": "tcp://x:1"},
            {"id": "b", "modality": "text", "source": "a.csv"}]}, tmp_path)


# -- clocks -----------------------------------------------------------------------------------------
def test_offset_estimator_recovers_offset_and_skew_from_jittered_arrivals():
    rng = np.random.default_rng(1)
    est = OffsetEstimator(window_s=10.0, bucket_s=0.5)
    true = np.arange(0, 20, 0.005)  # 200 Hz for 20 s
    device = 5e4 + true * (1 + 1e-3)  # 1000 ppm fast, 50000 s ahead
    arrival = true + rng.exponential(0.01, true.size) + 0.0002
    errs = []
    for d, a, t in zip(device, arrival, true):
        est.update(d, a)
        errs.append(d + est.offset(d) - t)
    errs = np.abs(np.array(errs[400:]))  # after the first 2 s
    assert np.percentile(errs, 95) < 0.002  # arrival stamping would be off by 10 ms on average


def test_zmq_imu_with_injected_skew_and_jitter_is_mapped_within_milliseconds(tmp_path):
    port = free_port()
    clock = SessionClock()
    pub = ImuPublisher(port, clock.epoch, rate=200, skew=800e-6, dev0=1234.5, jitter_s=0.006)
    src = open_live_source(_spec(tmp_path, modality="imu", kind="zmq", endpoint=f"tcp://127.0.0.1:{port}",
                                 topic="imu", clock="device"), clock, chunk_seconds=0.25)
    pub.start()
    chunks = _collect(src, lambda cs: sum(len(c) for c in cs) >= 700)
    pub.halt.set()
    t = np.concatenate([c.t for c in chunks])
    data = np.concatenate([c.data for c in chunks])
    # Samples joined the publisher's record in order; the first few may predate the connection.
    first = int(np.flatnonzero((np.stack(pub.values) == data[0]).all(axis=1))[0])
    truth = np.array(pub.truth[first:first + len(t)])
    np.testing.assert_array_equal(data, np.stack(pub.values[first:first + len(t)]))
    err = np.abs(t - truth)[200:]  # after the first second
    assert np.all(np.diff(t) > 0), "mapped times must increase"
    print(f"device clock mapping error: median {np.median(err) * 1e3:.2f} ms, p95 {np.percentile(err, 95) * 1e3:.2f} ms "
          f"(jitter mean 6 ms, skew 800 ppm)")
    assert np.percentile(err, 95) < 0.005 and np.median(err) < 0.003
    assert chunks[0].modality == "imu" and chunks[0].data.dtype == np.float32


def test_zmq_source_counts_malformed_messages_and_keeps_going(tmp_path):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    clock = SessionClock()
    src = open_live_source(_spec(tmp_path, modality="depth", kind="zmq", endpoint=f"tcp://127.0.0.1:{port}",
                                 clock="session"), clock, chunk_seconds=0.1)
    good = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000

    def send():
        time.sleep(0.3)
        for i in range(20):
            pub.send(b"\x93garbage")
            pub.send(msgpack.packb({"t": clock.epoch + i, "shape": [3, 5], "dtype": "uint16", "data": good.tobytes()}))
            pub.send(msgpack.packb({"t": clock.epoch + i, "shape": [3, 4], "dtype": "uint16", "data": good.tobytes()}))
            time.sleep(0.01)

    th = threading.Thread(target=send, daemon=True)
    th.start()
    chunks = _collect(src, lambda cs: sum(len(c) for c in cs) >= 20)
    pub.close(linger=0)
    t = np.concatenate([c.t for c in chunks])
    np.testing.assert_allclose(t[:5], np.arange(5) + t[0] - round(t[0]), atol=1e-6)  # session clock = Unix - epoch
    assert round(t[0]) == t[0] or abs(t[0] - round(t[0])) < 1e-6
    assert chunks[0].data.dtype == np.uint16  # millimetres travel as sent
    np.testing.assert_array_equal(frame_values("depth", chunks[0].data[0]), good.astype(np.float32) / np.float32(1000))
    assert src.dropped["bad_message"] >= 40


def test_zmq_input_with_curve_keys_reads_only_from_the_rig_it_trusts(tmp_path):
    from zmq.auth.thread import ThreadAuthenticator

    from sinks.keys import CurveServerConfig, generate_keys

    keys = generate_keys(tmp_path / "keys", clients=("bindstream",))
    rig = CurveServerConfig.from_files(keys["server"], tmp_path / "keys" / "authorized_clients")
    ctx = zmq.Context.instance()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(tmp_path / "keys" / "authorized_clients"))
    pub = ctx.socket(zmq.PUB)
    pub.curve_secretkey, pub.curve_publickey, pub.curve_server = rig.secret_key, rig.public_key, True
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    clock = SessionClock()
    base = dict(modality="imu", kind="zmq", endpoint=f"tcp://127.0.0.1:{port}", clock="session")
    trusted = open_live_source(_spec(tmp_path, **base, curve_server_key=str(tmp_path / "keys" / "server.key"),
                                     curve_client_key=str(keys["bindstream"])), clock, chunk_seconds=0.1)
    plain = open_live_source(_spec(tmp_path, **base), clock, chunk_seconds=0.1)
    stop = threading.Event()

    def send():
        i = 0
        while not stop.is_set():
            pub.send(msgpack.packb({"t": clock.epoch + i * 0.01, "shape": [6], "dtype": "float32",
                                    "data": np.ones(6, np.float32).tobytes()}))
            i += 1
            time.sleep(0.005)

    th = threading.Thread(target=send, daemon=True)
    th.start()
    try:
        got_plain = []
        plain_thread = threading.Thread(target=lambda: got_plain.extend(plain), daemon=True)
        plain_thread.start()
        got = _collect(trusted, lambda cs: sum(len(c) for c in cs) >= 20)
        plain.stop()
        plain_thread.join(10)
    finally:
        stop.set()
        th.join(5)
        pub.close(linger=0)
        auth.stop()
    assert sum(len(c) for c in got) >= 20
    assert sum(len(c) for c in got_plain) == 0  # a socket without the keys never completes the handshake
    with pytest.raises(ConfigError, match="needs 'curve_client_key' too"):
        _spec(tmp_path, **base, curve_server_key=str(tmp_path / "keys" / "server.key"))


# -- imagezmq ---------------------------------------------------------------------------------------
@needs_video
@pytest.mark.parametrize("reqrep,jpeg", [(True, False), (False, False), (True, True)],
                         ids=["reqrep-array", "pubsub-array", "reqrep-jpeg"])
def test_imagezmq_sender_frames_arrive_as_rgb_vision_chunks(tmp_path, reqrep, jpeg):
    frames = real_frames(12)
    port = free_port()
    spec = _spec(tmp_path, modality="vision", kind="imagezmq", endpoint=f"tcp://127.0.0.1:{port}",
                 mode="reqrep" if reqrep else "pubsub")
    src = open_live_source(spec, SessionClock(), chunk_seconds=0.2, video_size=240)
    feeder = ImageZmqFeeder(f"tcp://127.0.0.1:{port}", frames,
                            reqrep=reqrep, jpeg=jpeg, fps=30)
    if not reqrep:
        feeder.start()  # the PUB side binds first
        feeder.ready.wait(5)
    if reqrep:
        feeder.start()
    chunks = _collect(src, lambda cs: sum(len(c) for c in cs) >= 15)
    feeder.halt.set()
    feeder.join(5)
    imgs = np.concatenate([c.data for c in chunks])
    assert imgs.shape[1:] == (240, 320, 3) and imgs.dtype == np.uint8
    if reqrep:
        assert feeder.replies and set(feeder.replies) == {b"OK"}
        first = feeder.sent[0]
    else:
        # PUB/SUB loses what was sent before the subscription: find where the stream starts.
        first = int(np.argmin([np.abs(imgs[0].astype(int) - f.astype(int)).mean() for f in frames]))
    for j, img in enumerate(imgs[:10]):
        diff = np.abs(img.astype(int) - frames[(first + j) % len(frames)].astype(int)).mean()
        assert diff < (4.0 if jpeg else 0.01), f"frame {j}: mean abs difference {diff}"
    t = np.concatenate([c.t for c in chunks])
    assert np.all(np.diff(t) > 0)


# -- url (UDP / MPEG-TS served by PyAV) --------------------------------------------------------------
@needs_video
def test_url_source_reads_a_udp_mpegts_stream_served_by_pyav(tmp_path):
    frames = real_frames(12)
    port = free_port()
    spec = _spec(tmp_path, modality="vision", kind="url", url=f"udp://127.0.0.1:{port}", timeout_s=3,
                 options={"probesize": 200000, "analyzeduration": 500000, "overrun_nonfatal": 1})
    src = open_live_source(spec, SessionClock(), chunk_seconds=0.2)
    server = UdpMpegTsServer(port, frames, fps=15)
    out = []

    def run():
        for c in src:
            out.append(c)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(0.3)  # the receiver binds the UDP port first
    server.start()
    deadline = time.time() + 20
    while time.time() < deadline and sum(len(c) for c in out) < 20:
        time.sleep(0.05)
    src.stop()
    server.halt.set()
    th.join(10)
    server.join(5)
    imgs = np.concatenate([c.data for c in out])
    t = np.concatenate([c.t for c in out])
    assert len(imgs) >= 20 and imgs.shape[1:] == (224, 298, 3)
    assert np.all(np.diff(t) > 0)
    # Stream pts (device clock) map onto the session clock: once the estimate has settled (the
    # first frames arrive in a burst after probing), frames 1/15 s apart stay so.
    assert abs(np.median(np.diff(t)[-10:]) - 1 / 15) < 0.01
    best = min(np.abs(imgs[5].astype(int) - av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
        width=298, height=224, format="rgb24", interpolation="AREA").to_ndarray().astype(int)).mean() for f in frames)
    assert best < 12, "decoded frames do not resemble the frames served"


def test_url_source_retries_with_backoff_and_stops_promptly(tmp_path):
    port = free_port()
    spec = _spec(tmp_path, modality="vision", kind="url", url=f"tcp://127.0.0.1:{port}", format="mpegts",
                 timeout_s=0.5, max_backoff_s=0.4)
    src = open_live_source(spec, SessionClock())
    errors = []
    chunks = _collect(src, lambda cs: src.dropped.get("reconnect", 0) >= 3, timeout=15, errors=errors)
    assert chunks == [] and src.dropped["reconnect"] >= 3
    # Stopped without having delivered anything: the stream failed, naming the url and why.
    assert len(errors) == 1 and isinstance(errors[0], SourceError)
    assert f"stream 's': url tcp://127.0.0.1:{port} delivered nothing in" in str(errors[0])
    assert "last: cannot open: Connection refused" in str(errors[0])


def test_a_device_that_is_not_one_fails_its_stream_at_once_naming_device_and_reason(tmp_path):
    not_a_device = tmp_path / "notes.txt"
    not_a_device.write_text("not a camera")
    spec = _spec(tmp_path, modality="vision", kind="device", format="v4l2", device=str(not_a_device))
    src = open_live_source(spec, SessionClock())
    errors = []
    t0 = time.monotonic()
    _collect(src, lambda cs: bool(errors), timeout=10, errors=errors)
    assert time.monotonic() - t0 < 5 and len(errors) == 1 and isinstance(errors[0], SourceError), errors
    assert f"stream 's': cannot open device '{not_a_device}' (format v4l2): " in str(errors[0])


# -- device (PyAV input formats) ------------------------------------------------------------------
@pytest.mark.skipif("lavfi" not in av.formats_available, reason="this FFmpeg has no lavfi input device")
def test_device_kind_reads_frames_from_an_ffmpeg_input_device(tmp_path):
    spec = _spec(tmp_path, modality="vision", kind="device", format="lavfi",
                 device="testsrc2=size=320x240:rate=20,realtime")
    src = open_live_source(spec, SessionClock(), chunk_seconds=0.2)
    chunks = _collect(src, lambda cs: sum(len(c) for c in cs) >= 10)
    imgs = np.concatenate([c.data for c in chunks])
    t = np.concatenate([c.t for c in chunks])
    assert imgs.shape[1:] == (224, 298, 3) and imgs.std() > 10
    assert abs(np.median(np.diff(t)) - 0.05) < 0.01


@pytest.mark.skipif(not glob.glob("/dev/video*") or "v4l2" not in av.formats_available,
                    reason="no V4L2 device (e.g. v4l2loopback) on this machine")
def test_device_kind_reads_a_v4l2_camera(tmp_path):
    dev = sorted(glob.glob("/dev/video*"))[0]
    spec = _spec(tmp_path, modality="vision", kind="device", format="v4l2", device=dev, size="320x240", rate=15)
    src = open_live_source(spec, SessionClock(), chunk_seconds=0.2)
    chunks = _collect(src, lambda cs: sum(len(c) for c in cs) >= 5)
    assert sum(len(c) for c in chunks) >= 5
