"""`record` never deletes or half-writes: a recording appears only when complete, an existing
one is never removed or overwritten, and a full disk ends recording with the file named while
the live run goes on publishing (exit 5)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from live_peers import ImuPublisher, free_port
from sources.base import Chunk
from sources.record import RecordingError, StreamRecorder, finish_recording, partial_folder

REPO = Path(__file__).resolve().parents[1]
FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk
needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this system")


def _imu_chunk(n: int, t0: float = 0.0) -> Chunk:
    t = t0 + np.arange(n) / 100.0
    return Chunk("imu", "imu", t, np.ones((n, 6), np.float32))


def _old_recording(out: Path, name: str) -> Path:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / "session.yaml").write_text("format: bindstream.session/1\nname: old\nstreams: []\n")
    return folder


@needs_dev_full
def test_a_stream_whose_file_cannot_be_written_names_the_file_and_stops_recording(tmp_path: Path) -> None:
    (tmp_path / "imu.csv").symlink_to(FULL)
    rec = StreamRecorder(tmp_path, "imu", "imu")
    for i in range(200):  # enough rows to pass the file's buffer
        rec.write(_imu_chunk(10, i * 0.1))
    assert rec.close() is None
    assert rec.error is not None
    assert f"writing {tmp_path / 'imu.csv'} failed: No space left on device" in rec.error
    assert rec.samples + rec.not_recorded == 2000


def test_a_new_recording_goes_beside_an_existing_one(tmp_path: Path) -> None:
    old = _old_recording(tmp_path, "rig")
    before = (old / "session.yaml").read_text()
    partial = partial_folder(tmp_path, "rig")
    rec = StreamRecorder(partial, "imu", "imu")
    rec.write(_imu_chunk(20))
    folder = finish_recording(partial, "rig", [rec.close()])
    assert folder == tmp_path / "rig.1" and (folder / "session.yaml").exists()
    assert (old / "session.yaml").read_text() == before
    assert not partial.exists()


def test_an_empty_recording_removes_only_its_own_partial_folder(tmp_path: Path) -> None:
    old = _old_recording(tmp_path, "rig")
    partial = partial_folder(tmp_path, "rig")
    rec = StreamRecorder(partial, "imu", "imu")
    assert finish_recording(partial, "rig", [rec.close()]) is None
    assert not partial.exists() and (old / "session.yaml").exists()


@needs_dev_full
def test_session_yaml_that_cannot_be_written_leaves_the_partial_folder_and_says_where(tmp_path: Path) -> None:
    partial = partial_folder(tmp_path, "rig")
    rec = StreamRecorder(partial, "imu", "imu")
    rec.write(_imu_chunk(20))
    entry = rec.close()
    (partial / ".session.yaml.tmp").symlink_to(FULL)
    with pytest.raises(RecordingError, match=r"writing .*session.yaml failed: No space left on device; "
                                             r"what was written is in .*\.rig\.recording-"):
        finish_recording(partial, "rig", [entry])
    assert (partial / "imu.csv").exists() and not (tmp_path / "rig").exists()


def _record(tmp_path: Path, out: Path, imu_port: int, seconds: float) -> subprocess.CompletedProcess:
    cfg = tmp_path / "live.yaml"
    cfg.write_text(f"""
sessions:
  - name: rig
    streams:
      - {{id: imu, modality: imu, kind: zmq, endpoint: "tcp://127.0.0.1:{imu_port}", clock: arrival}}
replay: {{chunk_seconds: 0.25}}
window: {{hop: 0.5, spans: {{imu: {{span: 1.0}}}}}}
model: {{config: imagebind_tiny, checkpoint: none, precision: fp32, device: cpu, threads: 1}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}"}}
ray: {{num_cpus: 2}}
stop_after: {seconds}
progress: false
""")
    return subprocess.run([sys.executable, "-m", "pipeline", "record", str(cfg), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_recording_a_live_session_that_receives_nothing_keeps_the_existing_recording(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    old = _old_recording(out, "rig")
    before = (old / "session.yaml").read_text()
    done = _record(tmp_path, out, free_port(), seconds=3)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (old / "session.yaml").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["rig"], "no partial folder is left behind"


def test_a_full_disk_ends_recording_names_the_file_and_the_live_run_keeps_publishing(tmp_path: Path) -> None:
    out = tmp_path / "small"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    port = free_port()
    pub = ImuPublisher(port, time.time(), rate=200, jitter_s=0.0, batch=4)
    pub.start()
    try:
        done = _record(tmp_path, out, port, seconds=6)
    finally:
        pub.halt.set()
        subprocess.run(["umount", str(out)], capture_output=True)
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text[-3000:]
    assert done.returncode == 5, text[-3000:]
    assert "RECORDING FAILED: recording stream 'imu': writing" in done.stdout
    assert "imu.csv failed: No space left on device" in done.stdout
    # The stream kept being embedded and published after its recording failed.
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("rig:"))
    windows = int(line.split(":")[1].split()[0])
    assert windows >= 6 and f"embeddings: imu {windows};" in line, line
