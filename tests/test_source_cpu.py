"""Per-stream CPU split of the replay sources: decode / resize / other, as the bench
reports it. Real PyAV decoding of generated and real (../shared) video.

Nothing here asserts a duration: the checks compare CPU counters of one process with each other
(the split cannot claim more CPU than the process used, and must not miss FFmpeg's own decoder
and scaler threads, where most of the work of a threaded video decode happens).
"""

from __future__ import annotations

import asyncio
import threading
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


class _CountingSession:
    """Stands in for the session's aligner: counts what the reader pushes."""

    def __init__(self) -> None:
        self.samples = 0
        self.ended: list = []

    async def push(self, chunk, seq: int) -> None:
        self.samples += len(chunk)

    async def wait_origin(self, timeout_s: float) -> None:
        return None

    async def end_stream(self, stream: str, error=None, dropped=None, chunks: int | None = 0) -> None:
        self.ended.append((stream, error))


def test_reader_end_stats_carry_the_split(demo: Path) -> None:
    from pipeline.reader import SessionPort, StreamReader

    # The reader's pushes run on the session's event loop, in another thread, as in an aligner.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    session = _CountingSession()
    opts = {"chunk_seconds": 0.5, "video_size": 224, "max_pixels": 8192 * 8192, "max_gap_s": 0.0}
    try:
        p0 = time.process_time()
        stats = StreamReader("cpu-1", _stream(demo, "cam"), opts).run(SessionPort(session, loop, "cam", 4), 0.0)
        process_s = time.process_time() - p0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
    assert stats["error"] is None
    assert (session.samples, session.ended) == (90, [("cam", None)])
    assert stats["samples"] == 90 and stats["chunks"] == 6
    split = stats["cpu_split"]
    _assert_consistent(split, "cam reader")
    assert split["decode_s"] > 0 and split["resize_s"] > 0
    # The process's CPU also holds the event loop's thread: the split is part of it.
    assert stats["cpu_s"] == split["total_s"] <= process_s + 0.005, (split, process_s)
