"""A session's files are checked when they are opened, not only when the session is loaded.

Between validation and reading, a file can be swapped for a symlink to any file of the host.
Sources open with ``O_NOFOLLOW``, check where the descriptor's file lies and that it is the
file the session was loaded with (``sources._common.open_checked``), and decode from that
descriptor. Errors that reach subscribers name paths relative to the session folder and
never quote a file's content.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from sources.demo import write_demo_session
from sources.errors import SourceError
from sources.replay import open_source
from sources.session import load_session, session_from_dict
from sinks.protocol import decode

SECRET = "TOPSECRET-7f3a9c,hunter2,do-not-leak"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_session(tmp_path_factory.mktemp("demo") / "s", seconds=3.0, seed=5, name="swap")


@pytest.fixture
def session(demo, tmp_path) -> Path:
    """A fresh copy of the demo session, and an outside folder holding a secret."""
    shutil.copytree(demo, tmp_path / "s")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(SECRET + "\n1,2,3\n")
    png = sorted((demo / "depth").glob("*.png"))[0]
    (outside / "000000.png").write_bytes(png.read_bytes())
    return tmp_path / "s"


def _swap(path: Path, target: Path) -> None:
    """Replace ``path`` (file or folder) by a symlink to ``target``."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def _refusal(spec) -> str:
    with pytest.raises(SourceError) as err:
        for _ in open_source(spec):
            pass
    return str(err.value)


def _assert_clean(msg: str, session: Path) -> None:
    assert "TOPSECRET" not in msg and "hunter2" not in msg
    assert str(session.parent) not in msg, f"absolute path in {msg!r}"


@pytest.mark.parametrize("stream, name", [("imu", "imu.csv"), ("captions", "captions.jsonl"),
                                          ("cam", "video.mp4"), ("mic", "video.mp4")])
def test_a_source_file_swapped_for_a_symlink_after_loading_is_refused(session, stream, name):
    spec = load_session(session).stream(stream)
    _swap(session / name, session.parent / "outside" / "secret.csv")
    msg = _refusal(spec)
    assert f"session 'swap' stream '{stream}'" in msg and f"{name} is a symlink now" in msg
    _assert_clean(msg, session)


def test_a_frame_folder_swapped_for_a_symlink_is_refused_before_listing(session):
    spec = load_session(session).stream("depth")
    _swap(session / "depth", session.parent / "outside")
    msg = _refusal(spec)
    assert "stream 'depth'" in msg and "depth is a symlink now" in msg
    _assert_clean(msg, session)


def test_a_frame_swapped_for_a_symlink_leading_outside_is_refused(session):
    spec = load_session(session).stream("depth")
    frame = sorted((session / "depth").glob("*.png"))[3]
    _swap(frame, session.parent / "outside" / "000000.png")
    msg = _refusal(spec)
    assert f"depth/{frame.name} leads outside the session folder" in msg
    _assert_clean(msg, session)


def test_a_timestamps_file_swapped_for_a_symlink_is_refused(session):
    spec = load_session(session).stream("thermal")
    _swap(session / "thermal" / "timestamps.csv", session.parent / "outside" / "secret.csv")
    msg = _refusal(spec)
    assert "thermal/timestamps.csv is a symlink now" in msg
    _assert_clean(msg, session)


def test_a_file_replaced_by_another_file_is_refused_as_not_the_one_loaded(session):
    spec = load_session(session).stream("imu")
    # replaced as editors and attackers do: a new file renamed over the old one (a new inode)
    shutil.copy(session.parent / "outside" / "secret.csv", session / "imu.csv.new")
    os.replace(session / "imu.csv.new", session / "imu.csv")
    msg = _refusal(spec)
    assert "imu.csv is not the file the session was loaded with" in msg
    _assert_clean(msg, session)


def test_a_npy_source_swapped_for_a_symlink_is_refused(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    np.save(root / "depth.npy", np.ones((3, 8, 8), np.uint16))
    np.save(root / "depth_t.npy", np.arange(3.0))
    np.save(tmp_path / "other.npy", np.full((3, 8, 8), 7, np.uint16))
    doc = {"format": "bindstream.session/1", "name": "n",
           "streams": [{"id": "depth", "modality": "depth", "source": "depth.npy"}]}
    spec = session_from_dict(doc, root).stream("depth")
    assert sum(len(c) for c in open_source(spec)) == 3  # read from the checked descriptor
    _swap(root / "depth.npy", tmp_path / "other.npy")
    with pytest.raises(SourceError, match=r"stream 'depth': depth.npy is a symlink now"):
        open_source(spec)


def test_symlinks_that_stay_inside_the_session_still_read(session):
    frames = sorted((session / "depth").glob("*.png"))
    spare = session / "spare.png"
    shutil.copy(frames[2], spare)
    frames[2].unlink()
    frames[2].symlink_to(spare)  # a frame that is a symlink within the session, at load and at read
    spec = load_session(session).stream("depth")
    assert sum(len(c) for c in open_source(spec)) == len(frames)


# -- what an error may say -------------------------------------------------------------------------

def test_a_missing_column_error_names_the_file_relative_and_does_not_quote_the_header(session):
    """The header is checked when the session loads (a config error, printed to the user who owns
    the file); a file rewritten in place after that fails its stream with a message that goes to
    subscribers, so it names the column and the relative path but quotes nothing of the file."""
    spec = load_session(session).stream("imu")
    with open(session / "imu.csv", "r+") as f:  # the same file (same inode), a new header
        f.write("device_ms,kind,SECRETCOLUMN,acc_y_g\n1,imu,0,0\n")
        f.truncate()
    msg = _refusal(spec)
    assert "column 'acc_x_g' (key columns.ax) missing in the header row of imu.csv" in msg
    assert "SECRETCOLUMN" not in msg
    _assert_clean(msg, session)


def test_a_bad_timestamp_row_is_named_by_its_line_not_quoted(session):
    ts = session / "depth" / "timestamps.csv"
    lines = ts.read_text().splitlines()
    lines[3] = "TOPSECRET" if "," not in lines[3] else "000002.png,TOPSECRET"
    ts.write_text("\n".join(lines) + "\n")
    msg = _refusal(load_session(session).stream("depth"))
    assert "depth/timestamps.csv line 4: the time is not a number" in msg
    _assert_clean(msg, session)


# -- end to end: what a real subscriber receives ----------------------------------------------------

class RawSubscriber:
    """A real SUB socket keeping every frame as received, until the session's ``end``."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.messages: list = []
        self.thread: threading.Thread | None = None

    def start(self, endpoint: str) -> None:
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint, ready), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, endpoint: str, ready: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVTIMEO, 120_000)
        sock.connect(endpoint)
        sock.subscribe(b"")
        ready.set()
        try:
            while True:
                parts = sock.recv_multipart()
                self.frames.extend(parts)
                msg = decode(parts)
                self.messages.append(msg)
                if msg.topic.startswith("ctl/") and msg.payload["event"] == "end":
                    return
        finally:
            sock.close(linger=0)


@pytest.mark.usefixtures("ray_cluster")
def test_a_swap_after_validation_fails_the_stream_and_nothing_of_the_file_reaches_a_subscriber(session):
    from pipeline.run import EXIT_STREAM_FAILED, run
    from test_pipeline_e2e import _config

    sub = RawSubscriber()
    cfg = _config([session])

    def on_ready(endpoint: str) -> None:
        # The sessions are loaded and validated; no stream has opened its file yet.
        _swap(session / "imu.csv", session.parent / "outside" / "secret.csv")
        sub.start(endpoint)

    result = run(cfg, on_ready=on_ready)
    sub.thread.join(60)
    assert result.exit_code == EXIT_STREAM_FAILED == 3
    (summary,) = result.sessions
    assert list(summary["errors"]) == ["imu"]
    err = summary["errors"]["imu"]
    assert "session 'swap' stream 'imu': imu.csv is a symlink now" in err
    raw = b"".join(sub.frames)
    assert b"TOPSECRET" not in raw and b"hunter2" not in raw
    assert str(session.parent).encode() not in raw, "an absolute path reached a subscriber"
    (end,) = [m for m in sub.messages if m.topic.startswith("ctl/") and m.payload["event"] == "end"]
    assert "imu.csv is a symlink now" in end.payload["errors"]["imu"]
    published = {m.payload["modality"] for m in sub.messages if m.topic.startswith("emb/")}
    assert published == {"vision", "audio", "depth", "thermal", "text"}  # the other streams completed


# -- names that become paths: refused before Ray starts ----------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, stream_id, key", [
    ("rig", "..", "session 'rig' streams[0]: key 'id': expected a stream id"),  # its PNGs would land in the out root
    ("r" * 200, "depth", "key 'name': expected a session name of 1-128 letters"),
])
def test_a_live_session_whose_name_or_stream_id_is_no_safe_folder_name_exits_2_before_ray_starts(
        tmp_path, name, stream_id, key):
    import subprocess
    import sys

    out = tmp_path / "recordings"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sessions": [{"name": name, "streams": [
            {"id": stream_id, "modality": "depth", "kind": "zmq", "endpoint": "tcp://127.0.0.1:5999"}]}],
        "record": str(out),
        "model": {"config": "imagebind_tiny", "precision": "fp32"},
        # Nothing listens there: had the run got as far as Ray, joining it would fail, not exit 2.
        "ray": {"address": "127.0.0.1:9"},
    }))
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.startswith("config error:") and key in res.stderr, res.stderr
    assert not out.exists()  # nothing recorded, not even the folder
