"""The demo session generator: deterministic output, and every stream replays sensibly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sources.demo import ensure_demo_session, write_demo_session
from sources.session import load_session
from sources.base import frame_values
from sources.replay import open_session

SECONDS = 2.0
SIZE = (160, 120)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_session(tmp_path_factory.mktemp("demo") / "sess", seconds=SECONDS, size=SIZE, fps=15)


def test_same_arguments_give_byte_identical_sessions(demo: Path, tmp_path: Path) -> None:
    again = write_demo_session(tmp_path / "again", seconds=SECONDS, size=SIZE, fps=15)
    a, b = _digests(demo), _digests(again)
    assert a == b
    assert {"session.yaml", "video.mp4", "imu.csv", "captions.jsonl", "depth/timestamps.csv"} <= set(a)


def test_another_seed_gives_another_scene(demo: Path, tmp_path: Path) -> None:
    other = write_demo_session(tmp_path / "other", seconds=SECONDS, size=SIZE, fps=15, seed=1)
    assert _digests(other)["video.mp4"] != _digests(demo)["video.mp4"]


def test_every_demo_stream_replays_over_the_whole_session(demo: Path) -> None:
    session = load_session(demo)
    assert session.name == "demo-ego"
    assert {s.modality for s in session.streams} == {"vision", "audio", "imu", "depth", "thermal", "text"}
    out = {}
    for sid, src in open_session(session).items():
        chunks = list(src)
        assert chunks, f"stream {sid} produced nothing"
        assert src.dropped == {}, f"stream {sid} dropped {src.dropped}"
        t = np.concatenate([c.t for c in chunks])
        assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < SECONDS + 0.1, sid
        out[sid] = (t, chunks)
    t, cam = out["cam"]
    assert len(t) == 30 and cam[0].data.shape[1:] == (224, 298, 3)
    t, mic = out["mic"]
    pcm = np.concatenate([c.data for c in mic])
    assert abs(len(pcm) - SECONDS * 16000) < 2048 and 0.05 < pcm.std() < 1.0
    t, imu = out["imu"]
    assert len(t) == SECONDS * 200  # temperature rows filtered by `where`
    assert t[1] - t[0] == pytest.approx(0.005, abs=1e-6)  # ms device clock + offset -> session seconds
    data = np.concatenate([c.data for c in imu])
    assert np.allclose(data[:, 2], 9.80665, atol=1e-4)  # 1 g written, m/s^2 read
    assert np.abs(data[:, 5]).max() > 0.05  # head yaw rate in rad/s
    t, depth = out["depth"]
    d = np.concatenate([c.data for c in depth])
    assert len(t) == SECONDS * 10 and d.shape[1:] == (60, 80) and d.dtype == np.uint16  # mm, as on disk
    d = frame_values("depth", d)
    assert 0.8 < d[d > 0].min() and d.max() <= 3.0  # metres
    t, thermal = out["thermal"]
    th = frame_values("thermal", np.concatenate([c.data for c in thermal]))
    assert len(t) == SECONDS * 10 and 0.2 < th.min() and th.max() < 0.9
    t, caps = out["captions"]
    assert all(isinstance(x, str) and x for c in caps for x in c.data)


def _pixel_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 15) -> int:
    """Integer s maximising the overlap of b[x] with a[x - s]: how far content moved right."""
    m, w = max_shift, len(a)
    return max(range(-m, m + 1), key=lambda s: float(np.dot(b[m:w - m], a[m - s:w - m - s])))


def test_imu_yaw_rate_matches_the_panning_video(demo: Path) -> None:
    """The background stripes scroll by yaw * width pixels as the head turns; the yaw rate
    measured from the decoded video must agree with the gyro read back from the CSV."""
    sources = open_session(load_session(demo))
    gray = np.concatenate([c.data for c in sources["cam"]]).astype(np.float32).mean(-1)  # (N, 224, 298)
    gz = np.concatenate([c.data for c in sources["imu"]])[:, 5]  # rad/s at 200 Hz
    profile = gray[:, -20:, :].mean(1)  # bottom rows: stripes only
    profile -= profile.mean(1, keepdims=True)
    shifts = np.array([_pixel_shift(profile[i], profile[i + 1]) for i in range(len(profile) - 1)])
    px_per_rad = SIZE[0] * 224 / SIZE[1]  # scene width in decoded pixels
    video_rate = -shifts / px_per_rad * 15  # world moves left when the head turns right
    t_mid = (np.arange(len(shifts)) + 0.5) / 15
    gyro_rate = np.interp(t_mid, np.arange(len(gz)) / 200, gz)
    assert np.corrcoef(video_rate, gyro_rate)[0, 1] > 0.8
    assert np.abs(video_rate - gyro_rate).mean() < 0.06  # within the 1-pixel quantisation


def test_ensure_demo_session_writes_once(tmp_path: Path) -> None:
    dest = tmp_path / "first"
    ensure_demo_session(dest, seconds=0.5, size=SIZE)
    stamp = (dest / "video.mp4").stat().st_mtime_ns
    (dest / "marker").write_text("kept")
    ensure_demo_session(dest, seconds=0.5, size=SIZE)
    assert (dest / "video.mp4").stat().st_mtime_ns == stamp and (dest / "marker").exists()
    assert load_session(dest).name == "demo-ego"
