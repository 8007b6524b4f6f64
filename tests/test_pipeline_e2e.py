"""Sessions replayed through the full Ray graph, read back by a real ZeroMQ SUB socket.

Real Ray actors, real PyAV decoding, real sockets on 127.0.0.1, real forward passes of the tiny
model (seeded random weights: ImageBind's weights cannot be downloaded here).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.config import parse_config
from sources.demo import write_demo_session
from sinks.protocol import decode, embedding_array
from sources.session import load_session


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    a = write_demo_session(root / "a", seconds=5.0, seed=0, name="ego-a")
    b = write_demo_session(root / "b", seconds=4.0, seed=1, name="ego-b")
    return a, b


class Subscriber:
    """A real SUB socket collecting every message until each expected session sent `end`."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.messages = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, endpoint: str) -> None:
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint, ready), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, endpoint: str, ready: threading.Event) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVTIMEO, 120_000)
        sock.connect(endpoint)
        sock.subscribe(b"")
        ready.set()
        ends = 0
        try:
            while ends < self.sessions:
                msg = decode(sock.recv_multipart())
                self.messages.append(msg)
                if msg.topic.startswith("ctl/") and msg.payload["event"] == "end":
                    ends += 1
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            sock.close(linger=0)

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive(), "subscriber never saw every session's end"
        if self.error:
            raise self.error


def _config(sessions, **over):
    data = {
        "sessions": [str(s) for s in sessions],
        "replay": {"rate": 0, "chunk_seconds": 0.5},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1},
        "encoders": {"replicas": 1, "max_batch": 8, "max_wait_ms": 5},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 60, "heartbeat_s": 0.5},
        "progress": False,
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def _replay(sessions, **over):
    from pipeline.run import run

    sub = Subscriber(len(sessions))
    result = run(_config(sessions, **over), on_ready=sub.start)
    sub.join()
    return result, sub.messages


def _expected_windows(session_dir: Path, cfg):
    """The windows the aligner makes from the same sources, in process: the reference."""
    from pipeline.inprocess import session_windows

    spec = load_session(session_dir)
    return spec, session_windows(spec, cfg.align, chunk_seconds=0.5)


def _embeddings(messages):
    out = {}
    for m in messages:
        if m.topic.startswith("emb/"):
            key = (m.payload["session"], m.payload["modality"], m.payload["window"])
            assert key not in out, f"duplicate embedding {key}"
            out[key] = embedding_array(m)
    return out


def test_replay_delivers_every_window_once_in_order_equal_to_the_direct_encoder_output(demo_dirs):
    from encoders.imagebind import load

    a, b = demo_dirs
    # A 3 s IMU span: the encoders resample each IMU window over the span it covers.
    result, messages = _replay([a, b], window={"spans": {"imu": {"span": 3.0}}})
    assert result.exit_code == 0
    # Every item was encoded once; the encoders' start-up warm-up forwards are not counted.
    encoded = collections.Counter()
    for e in result.encoder_stats:
        encoded.update(e["items"])
    assert encoded == collections.Counter(m.payload["modality"] for m in messages if m.topic.startswith("emb/"))
    cfg = _config([a, b], window={"spans": {"imu": {"span": 3.0}}})
    model = load("imagebind_tiny", "none", device="cpu", precision="fp32", seed=0)

    by_topic = collections.defaultdict(list)
    for m in messages:
        by_topic[m.topic].append(m)
    for topic, msgs in by_topic.items():
        if topic.startswith("emb/"):
            assert [m.payload["seq"] for m in msgs] == list(range(len(msgs))), f"{topic}: seq not contiguous"
            windows = [m.payload["window"] for m in msgs]
            assert windows == sorted(windows), f"{topic}: not in window order"
        else:
            assert msgs[0].payload["event"] == "start" and msgs[-1].payload["event"] == "end"

    for session_dir in (a, b):
        _assert_equals_direct_encoder(session_dir, cfg, messages, model)


def _assert_equals_direct_encoder(session_dir, cfg, messages, model):
    """The session's published windows are exactly the in-process reference windows, each
    embedding equal to the model's own output for that window, and its end event agrees."""
    import torch

    from encoders.preprocess import prepare

    got = _embeddings(messages)
    spec, windows = _expected_windows(session_dir, cfg)
    end = [m for m in messages if m.topic == f"ctl/{spec.name}" and m.payload["event"] == "end"][0].payload
    expected = {(spec.name, it.modality, it.window): it for w in windows for it in w.items}
    received = {k for k in got if k[0] == spec.name}
    assert received == set(expected), "windows missing or extra"
    assert end["windows"] == len(windows)
    counts = collections.Counter(k[1] for k in received)
    assert end["counts"] == dict(counts)
    assert set(counts) == {"vision", "audio", "imu", "depth", "thermal", "text"}
    for modality in counts:
        items = [expected[k] for k in sorted(expected) if k[1] == modality]
        with torch.no_grad():
            direct = model.encode(modality, prepare(modality, [it.payload for it in items], "cpu",
                                                    imu_duration=cfg.align.spans["imu"].span)).numpy()
        for it, row in zip(items, direct):
            emb = got[(spec.name, modality, it.window)]
            np.testing.assert_allclose(emb, row, atol=1e-5, err_msg=f"{spec.name}/{modality}/{it.window}")
            assert abs(np.linalg.norm(emb) - 1) < 1e-5


def test_paced_replay_cut_at_window_ends_delivers_the_same_windows(demo_dirs):
    """Paced replay (rate > 0) sends each stream's first sample alone, cuts 1.5 s chunks where
    windows wait and sends watermarks between captions: every window still arrives once, equal
    to the reference, and the chunks were cut."""
    from encoders.imagebind import load

    a, _ = demo_dirs
    result, messages = _replay([a], replay={"rate": 5.0, "chunk_seconds": 1.5})
    assert result.exit_code == 0
    cfg = _config([a], replay={"rate": 5.0, "chunk_seconds": 1.5})
    _assert_equals_direct_encoder(a, cfg, messages, load("imagebind_tiny", "none", device="cpu", precision="fp32", seed=0))
    end = next(m.payload for m in messages if m.topic.startswith("ctl/") and m.payload["event"] == "end")
    assert end["dropped"] == {}, end["dropped"]  # in replay nothing is lost, the first chunks included
    chunks = {s["stream"]: s["chunks"] for s in result.source_stats}
    # 5 s of IMU in 1.5 s chunks: 4 whole. Pieces: the first sample, then each chunk but the
    # last cut at the window end inside it (1, 2 and 4 s): 8.
    assert chunks["imu"] == 8, chunks
    # The watermarks release the caption stream's part of windows without a caption: those
    # parts hold nothing and cost no call to an encoder; every call carried items.
    assert any(m.payload["modality"] == "text" for m in messages if m.topic.startswith("emb/"))
    assert sum(e["requests"].get("empty", 0) for e in result.encoder_stats) == 0
    assert sum(e["requests"].get("with_items", 0) for e in result.encoder_stats) > 0


def test_two_replays_with_different_batching_and_frame_selection_give_the_same_embeddings(demo_dirs):
    """Every frame scaled and pushed at batch 1, each release sent to an encoder at once,
    against frame selection (docs/alignment.md) at batch 32 over two replicas with releases
    coalesced for 50 ms, each batch prepared ahead in the encoders' second thread. The origin is
    configured (the demo's streams start at 0, as with ``auto``), so the sources select from
    their first frame on."""
    a, _ = demo_dirs
    r1, m1 = _replay([a], encoders={"max_batch": 1, "max_wait_ms": 0, "coalesce_ms": 0},
                     sources={"select_frames": False})
    r2, m2 = _replay([a], encoders={"max_batch": 32, "max_wait_ms": 50, "replicas": 2, "coalesce_ms": 50,
                                    "prepare_ahead": True},
                     window={"origin": 0.0})
    e1, e2 = _embeddings(m1), _embeddings(m2)
    assert e1.keys() == e2.keys() and len(e1) > 20
    for k in e1:
        np.testing.assert_allclose(e1[k], e2[k], atol=1e-5, err_msg=str(k))
    calls = [sum(e["requests"].get("with_items", 0) for e in r.encoder_stats) for r in (r1, r2)]
    assert calls[1] < calls[0], calls  # the same items in fewer encoder calls
    skipped = [{s["stream"]: s["frames_skipped"] for s in r.source_stats} for r in (r1, r2)]
    assert set(skipped[0].values()) == {0}
    # 5 s at 15 fps / 10 Hz: about 2 camera frames and 1 depth / thermal frame per window stay.
    assert skipped[1]["cam"] >= 50 and skipped[1]["depth"] >= 35 and skipped[1]["thermal"] >= 35, skipped[1]
    assert skipped[1]["mic"] == skipped[1]["imu"] == skipped[1]["captions"] == 0
    pids = [{s["stream"]: s["pid"] for s in r.source_stats} for r in (r1, r2)]
    assert all(len(set(p.values())) == 1 and len(p) == 6 for p in pids)  # one process for the session


@pytest.mark.skipif(not (SHARED / "fixtures" / "real").is_dir(), reason="../shared/fixtures/real is absent")
def test_real_recordings_replay_end_to_end(tmp_path):
    """Phone video with sound, an x-IMU3 CSV in deg/s and g on its own microsecond clock, and a
    real 16-bit depth map, in a session folder built here."""
    real = SHARED / "fixtures" / "real"
    sess = tmp_path / "real"
    (sess / "depth").mkdir(parents=True)
    shutil.copy(real / "realshort.mp4", sess / "video.mp4")
    shutil.copy(real / "imu_xio3_50hz.csv", sess / "imu.csv")
    shutil.copy(real / "motorcycle_depth_mm_u16.png", sess / "depth" / "000000.png")
    (sess / "depth" / "timestamps.csv").write_text("0.5\n")
    first_us = float((sess / "imu.csv").read_text().splitlines()[1].split(",")[0])
    header = (sess / "imu.csv").read_text().splitlines()[0].split(",")
    col = {h.split("(")[0].strip(): h.strip() for h in header}
    (sess / "session.yaml").write_text(f"""
format: bindstream.session/1
name: real-0001
streams:
  - {{id: cam, modality: vision, source: video.mp4}}
  - {{id: mic, modality: audio, source: video.mp4}}
  - id: imu
    modality: imu
    source: imu.csv
    columns: {{t: "{col['Timestamp']}", ax: "{col['Accelerometer X']}", ay: "{col['Accelerometer Y']}", az: "{col['Accelerometer Z']}",
              gx: "{col['Gyroscope X']}", gy: "{col['Gyroscope Y']}", gz: "{col['Gyroscope Z']}"}}
    time_unit: us
    accel_unit: g
    gyro_unit: deg/s
    offset: {-first_us / 1e6}
  - {{id: depth, modality: depth, source: depth/, timestamps: depth/timestamps.csv, depth_unit: mm}}
""")
    result, messages = _replay([sess])
    assert result.exit_code == 0, result.sessions
    got = _embeddings(messages)
    end = [m for m in messages if m.topic == "ctl/real-0001" and m.payload["event"] == "end"][0].payload
    assert end["windows"] == 10  # the IMU runs 10 s; video and audio end after 1.2 s
    counts = collections.Counter(k[1] for k in got)
    assert counts["imu"] == 10 and counts["depth"] == 1
    # 2 s spans: the windows ending at 1, 2 and 3 s overlap the 1.2 s of video and sound
    assert counts["vision"] == 3 and counts["audio"] == 3
    assert end["counts"] == dict(counts)
    assert all(np.isfinite(e).all() for e in got.values())


def test_cli_run_exits_3_when_a_stream_fails_and_the_others_complete(tmp_path, demo_dirs):
    a, _ = demo_dirs
    sess = tmp_path / "broken"
    shutil.copytree(a, sess)
    video = sess / "video.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])  # truncated recording
    text = (sess / "session.yaml").read_text().replace("name: ego-a", "name: broken")
    (sess / "session.yaml").write_text(text)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
sessions: ["{sess}"]
replay: {{rate: 0}}
model: {{config: imagebind_tiny, checkpoint: none, precision: fp32, device: cpu}}
publish: {{endpoint: "tcp://127.0.0.1:*"}}
ray: {{num_cpus: 2}}
progress: false
""")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAILED stream" in proc.stdout
    assert "imu" in proc.stdout and "depth" in proc.stdout  # the others still produced embeddings


def test_cli_config_error_exits_2_before_starting_anything(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("sessions: [nowhere]\nencoders: {max_batch: lots}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "encoders.max_batch" in proc.stderr
    cfg.write_text("sessions: [nowhere]\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nowhere" in proc.stderr


def test_a_picked_publisher_port_taken_before_the_bind_is_picked_again(demo_dirs, monkeypatch):
    """``tcp://127.0.0.1:*`` is fixed to a concrete port in the driver, so that a restarted
    publisher binds the same one; another process can take it before the publisher binds it.
    The run then picks another port and delivers everything."""
    from pipeline import run as run_mod

    a, _ = demo_dirs
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    taken = run_mod._fixed_endpoint("tcp://127.0.0.1:*")
    squatter.bind(taken)  # what an outgoing connection or another service could do in between
    real_pick, picks = run_mod._fixed_endpoint, []

    def pick(endpoint):
        picks.append(taken if not picks else real_pick(endpoint))
        return picks[-1]

    monkeypatch.setattr(run_mod, "_fixed_endpoint", pick)
    try:
        result, messages = _replay([a])
    finally:
        squatter.close(linger=0)
        ctx.term()
    assert result.exit_code == 0
    assert len(picks) == 2 and result.endpoint == picks[1] != taken
    end = next(m.payload for m in messages if m.topic.startswith("ctl/") and m.payload["event"] == "end")
    assert sum(end["counts"].values()) == sum(1 for m in messages if m.topic.startswith("emb/")) > 0


def test_a_picked_publisher_port_lies_outside_the_range_given_to_outgoing_connections():
    from pipeline.run import _fixed_endpoint

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not ranges.is_file():
        pytest.skip("the kernel's range for outgoing connections is only known on Linux")
    low = int(ranges.read_text().split()[0])
    for _ in range(5):
        port = int(_fixed_endpoint("tcp://127.0.0.1:*").rsplit(":", 1)[1])
        assert 20_000 <= port < low or low <= 20_000
    assert _fixed_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"


def test_a_failed_stream_named_publisher_is_a_stream_error_and_the_session_still_ends(tmp_path, demo_dirs):
    """Stream ids are the user's: one called ``publisher`` that fails is reported like any
    other stream, and the subscriber still gets the session's ``end``."""
    a, _ = demo_dirs
    sess = tmp_path / "named"
    shutil.copytree(a, sess)
    video = sess / "video.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])  # truncated recording
    text = (sess / "session.yaml").read_text().replace("name: ego-a", "name: named")
    (sess / "session.yaml").write_text(text.replace("- id: cam\n", "- id: publisher\n"))
    result, messages = _replay([sess])
    (summary,) = result.sessions
    assert "publisher" in summary["errors"] and "publisher lost" not in summary["errors"]["publisher"]
    assert result.exit_code == 3
    (end,) = [m.payload for m in messages if m.topic == "ctl/named" and m.payload["event"] == "end"]
    assert end["errors"] == summary["errors"]
    assert end["counts"]["imu"] == summary["counts"]["imu"] > 0
