"""Per-stream CPU split of the replay sources: decode / resize / other, as the bench
reports it. Real PyAV decoding of generated and real (../shared) video; real Ray actors.

Nothing here asserts a duration: the checks compare CPU counters of one process with each other
(the split cannot claim more CPU than the process used, and must not miss FFmpeg's own decoder
and scaler threads, where most of the work of a threaded video decode happens).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from sources.demo import write_demo_session
from pipeline.metrics import source_cpu_split
from sources.session import FORMAT, StreamSpec, load_session
from sources.replay import open_source

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
PARTS = ("decode_s", "resize_s", "other_s")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 640x360 at 30 fps: big enough that the decoder runs its frame threads.
    return write_demo_session(tmp_path_factory.mktemp("cpu") / "sess", seconds=3.0, size=(640, 360), fps=30)


def _stream(session_dir: Path, stream_id: str) -> StreamSpec:
    return next(s for s in load_session(session_dir).streams if s.id == stream_id)


def _drain_measured(spec: StreamSpec) -> tuple[dict, float, int]:
    """(split, process CPU seconds, samples) of reading ``spec`` to the end in this thread."""
    p0, t0 = time.process_time(), time.thread_time()
    src = open_source(spec, chunk_seconds=0.5)
    n = sum(len(c) for c in src)
    thread_s, process_s = time.thread_time() - t0, time.process_time() - p0
    return source_cpu_split(src, thread_s), process_s, n


def _assert_consistent(split: dict, where: str) -> None:
    assert split["measured"], where
    assert all(split[k] >= 0.0 for k in (*PARTS, "total_s")), (where, split)
    assert sum(split[k] for k in PARTS) <= split["total_s"] + 1e-6, (where, split)


def test_video_split_covers_the_decoder_and_scaler_threads(demo: Path) -> None:
    split, process_s, frames = _drain_measured(_stream(demo, "cam"))
    assert frames == 90
    _assert_consistent(split, "cam")
    assert split["decode_s"] > 0 and split["resize_s"] > 0, split
    # The split is made of this process's threads, so it cannot exceed the process's CPU ...
    assert split["total_s"] <= process_s + 0.005, (split, process_s)
    # ... and it accounts for nearly all of it: FFmpeg decodes in its own threads and the reading
    # thread mostly waits; the calling thread's time alone was ~40% of the process's CPU.
    assert split["total_s"] >= 0.85 * process_s, (split, process_s)


def test_png_frames_split_into_decode_and_conversion(demo: Path) -> None:
    split, process_s, frames = _drain_measured(_stream(demo, "depth"))
    assert frames == 30
    _assert_consistent(split, "depth")
    assert split["decode_s"] > 0 and split["total_s"] <= process_s + 0.005


def test_real_recording_splits_video_and_audio(tmp_path: Path) -> None:
    real = REAL / "realshort.mp4"
    if not real.is_file():
        pytest.skip(f"real fixture {real} not available (../shared absent)")
    (tmp_path / "v.mp4").write_bytes(real.read_bytes())
    (tmp_path / "session.yaml").write_text(yaml.safe_dump({"format": FORMAT, "name": "real-1", "streams": [
        {"id": "cam", "modality": "vision", "source": "v.mp4"}, {"id": "mic", "modality": "audio", "source": "v.mp4"}]}))
    for sid in ("cam", "mic"):
        split, process_s, n = _drain_measured(_stream(tmp_path, sid))
        assert n > 0, sid
        _assert_consistent(split, sid)
        # audio: resampling 48 kHz -> 16 kHz is its resize_s
        assert split["decode_s"] > 0 and split["resize_s"] > 0, (sid, split)
        assert split["total_s"] <= process_s + 0.005, (sid, split, process_s)


def test_stream_without_a_meter_reports_its_thread_as_other(demo: Path) -> None:
    split, process_s, n = _drain_measured(_stream(demo, "imu"))
    assert n == 600
    assert not split["measured"]
    assert split["decode_s"] == split["resize_s"] == 0.0 and split["other_s"] == split["total_s"] > 0


def test_source_actor_end_stats_carry_the_split(demo: Path, ray_cluster: None) -> None:
    import ray

    from pipeline.actors import SourceActor

    @ray.remote(num_cpus=0)
    class _CountingAligner:
        """Stands in for the AlignerActor: counts what the source pushes."""

        def __init__(self) -> None:
            self.samples = 0
            self.ended: list = []

        def push(self, chunk, seq: int) -> None:
            self.samples += len(chunk)

        def end_stream(self, stream: str, error=None, dropped=None, chunks: int = 0) -> None:
            self.ended.append((stream, error))

        def state(self) -> tuple[int, list]:
            return self.samples, self.ended

    al = _CountingAligner.remote()
    opts = {"chunk_seconds": 0.5, "video_size": 224, "max_pixels": 8192 * 8192, "max_gap_s": 0.0}
    src = SourceActor.remote("cpu-1", _stream(demo, "cam"), al, opts)
    stats = ray.get(src.run.remote(0.0, 4), timeout=180)
    assert stats["error"] is None
    assert ray.get(al.state.remote()) == (90, [("cam", None)])
    split = stats["cpu_split"]
    _assert_consistent(split, "cam actor")
    assert split["decode_s"] > 0 and split["resize_s"] > 0
    # The actor's process CPU also holds Ray's own threads: the split is part of it.
    assert split["total_s"] <= stats["cpu_s"] + 0.005, (split, stats["cpu_s"])
