"""Edges of file input found by probing (IMU CSVs, captions): each is a counted drop or a clear
message naming the session, stream and file, never a silent loss, a leaked warning or a hang."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from sources.base import Chunk
from sources.demo import write_demo_session
from sources.errors import ConfigError
from sources.guard import StreamGuard
from sources.replay import open_source
from sources.session import FORMAT, load_session

IMU = {"id": "imu", "modality": "imu", "source": "imu.csv", "time_unit": "ms",
       "columns": {"t": "t", "ax": "ax", "ay": "ay", "az": "az", "gx": "gx", "gy": "gy", "gz": "gz"}}
HEADER = "t,ax,ay,az,gx,gy,gz"


def _session(root: Path, streams: list[dict], files: dict[str, str | bytes]):
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        (root / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "session.yaml").write_text(yaml.safe_dump({"format": FORMAT, "name": "edge", "streams": streams}))
    return load_session(root)


def _imu(tmp_path: Path, rows: list[str], **over):
    s = _session(tmp_path, [{**IMU, **over}], {"imu.csv": "\n".join([HEADER] + rows) + "\n"})
    src = open_source(s.stream("imu"))
    chunks = list(src)
    t = np.concatenate([c.t for c in chunks]) if chunks else np.zeros(0)
    data = np.concatenate([c.data for c in chunks]) if chunks else np.zeros((0, 6), np.float32)
    return src, t, data


def test_a_stray_quote_in_an_imu_csv_costs_its_row_not_the_rest_of_the_file(tmp_path, caplog):
    rows = [f"{10 * i},1,2,3,4,5,6" for i in range(10)]
    rows[3] = '30,1,"2,3,4,5,6'
    with caplog.at_level(logging.WARNING):
        src, t, _ = _imu(tmp_path, rows)
    assert t.tolist() == pytest.approx([0.01 * i for i in range(10) if i != 3])
    assert src.dropped == {"non_numeric": 1}
    assert "stream 'imu'" in caplog.text and "line 5 of imu.csv" in caplog.text


def test_quoted_header_names_and_quoted_numbers_still_read(tmp_path):
    s = _session(tmp_path, [IMU], {"imu.csv": '"t","ax","ay","az","gx","gy","gz"\n"0",1,2,3,4,5,6\n10,1,2,3,4,5,"6"\n'})
    chunks = list(open_source(s.stream("imu")))
    assert np.concatenate([c.t for c in chunks]).tolist() == pytest.approx([0.0, 0.01])


def test_a_binary_or_huge_header_row_is_quoted_escaped_and_bounded_in_the_config_error(tmp_path):
    header = "\x00\x1b[31mred," + "x" * 60_000 + "," + ",".join(f"c{i}" for i in range(50)) + "\n"
    with pytest.raises(ConfigError) as e:
        _session(tmp_path, [IMU], {"imu.csv": header + "0,1,2,3,4,5,6\n"})
    msg = str(e.value)
    assert len(msg) < 2000, len(msg)
    assert "\x00" not in msg and "\x1b" not in msg and "\\x00" in msg
    assert "stream 'imu'" in msg and "imu.csv" in msg and "(52 columns)" in msg


def test_an_imu_value_beyond_float32_is_a_dropped_row_without_a_warning(tmp_path):
    rows = ["0,1,2,3,4,5,6", "10,1e39,2,3,4,5,6", "20,1,2,3e38,4,5,6", "30,1,2,3,4,5,6"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning (overflow in cast) fails the test
        src, t, data = _imu(tmp_path, rows, accel_unit="g")  # 3e38 g is beyond float32 in m/s^2
    assert t.tolist() == pytest.approx([0.0, 0.03]) and np.isfinite(data).all()
    assert src.dropped == {"non_finite": 2}


# -- a timestamp beyond the session clock's range ---------------------------------------------

def test_a_caption_beyond_the_session_clock_is_a_logged_bad_timestamp_drop_with_the_fix(caplog):
    g = StreamGuard("sess", "captions", "text", max_gap_s=0, source="captions.jsonl")  # text: no jump rule
    chunk = Chunk("captions", "text", np.array([0.5, 1e30, 3.0, -2e12]), ["a", "far", "b", "before"])
    with caplog.at_level(logging.WARNING, "sources.guard"):
        out = g.apply(chunk)
    assert out.t.tolist() == [0.5, 3.0] and out.data == ["a", "b"]
    assert g.dropped == {"bad_timestamp": 2}
    assert "session 'sess' stream 'captions' (captions.jsonl)" in caplog.text and "1e+30" in caplog.text
    assert "time_unit and offset" in caplog.text


def test_epoch_seconds_pass_and_bad_timestamps_are_not_counted_twice_as_non_finite_data():
    g = StreamGuard("sess", "imu", "imu", max_gap_s=60)
    data = np.zeros((3, 6), np.float32)
    data[1, 0] = np.nan
    out = g.apply(Chunk("imu", "imu", np.array([1.7e9, 1.7e15, 1.7e9 + 0.01]), data))
    assert out.t.tolist() == [1.7e9, 1.7e9 + 0.01]
    assert g.dropped == {"bad_timestamp": 1}


def test_a_caption_at_1e30_costs_itself_only_and_the_run_ends(tmp_path, ray_cluster):
    """Through the real graph: the run ends (it hung before), the other stream's windows are
    all published, the caption is counted."""
    from test_pipeline_e2e import _config, _expected_windows, _replay

    demo = write_demo_session(tmp_path / "demo", seconds=4.0, seed=3, name="demo")
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    for folder, name in ((clean, "clean"), (bad, "bad")):
        folder.mkdir()
        shutil.copyfile(demo / "video.mp4", folder / "video.mp4")
        shutil.copyfile(demo / "captions.jsonl", folder / "captions.jsonl")
        (folder / "session.yaml").write_text(yaml.safe_dump({"format": FORMAT, "name": name, "streams": [
            {"id": "cam", "modality": "vision", "source": "video.mp4"},
            {"id": "captions", "modality": "text", "source": "captions.jsonl"}]}))
    with open(bad / "captions.jsonl", "a") as f:
        f.write(json.dumps({"t": 1e30, "text": "far future"}) + "\n")

    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(zip(("result", "messages"), _replay([bad]))), daemon=True)
    runner.start()
    runner.join(240)
    assert not runner.is_alive(), "the run did not end"
    result = out["result"]
    (summary,) = result.sessions
    assert result.exit_code == 0 and summary["dropped"] == {"captions:bad_timestamp": 1}, summary
    _, windows = _expected_windows(clean, _config([clean]))
    assert summary["windows"] == len(windows)
    vision = {m.payload["window"] for m in out["messages"] if m.topic == "emb/bad/vision"}
    assert vision == {it.window for w in windows for it in w.items if it.modality == "vision"} != set()


# -- timestamps in another unit than the stream's time_unit -----------------------------------

XIO = {"t": "Timestamp (us)", "ax": "Accelerometer X (g)", "ay": "Accelerometer Y (g)", "az": "Accelerometer Z (g)",
       "gx": "Gyroscope X (deg/s)", "gy": "Gyroscope Y (deg/s)", "gz": "Gyroscope Z (deg/s)"}
REAL_XIO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real" / "imu_xio3_50hz.csv"


def test_microseconds_read_as_seconds_warn_with_the_unit_that_fits_and_the_jumps_say_so(tmp_path, caplog):
    if not REAL_XIO.is_file():
        pytest.skip(f"real fixture {REAL_XIO} not available (../shared absent)")
    s = _session(tmp_path, [{"id": "imu", "modality": "imu", "source": "i.csv", "columns": XIO, "time_unit": "s"}],
                 {"i.csv": REAL_XIO.read_bytes()})
    with caplog.at_level(logging.WARNING):
        chunks = list(open_source(s.stream("imu")))
    assert "session 'edge' stream 'imu'" in caplog.text and "i.csv" in caplog.text
    assert "time_unit: s" in caplog.text and "in us they would be 0.020034 s apart" in caplog.text
    caplog.clear()
    g = StreamGuard("edge", "imu", "imu", max_gap_s=60)
    with caplog.at_level(logging.WARNING, "sources.guard"):
        for c in chunks:
            g.apply(c)
    assert g.dropped["jump"] > 0 and "check the stream's time_unit and offset keys" in caplog.text


def test_plausible_imu_spacing_and_a_single_wild_jump_mid_stream_give_no_unit_hint(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, t, _ = _imu(tmp_path, [f"{5 * i},1,2,3,4,5,6" for i in range(40)])
    assert len(t) == 40 and "time_unit" not in caplog.text
    g = StreamGuard("edge", "imu", "imu", max_gap_s=60)
    with caplog.at_level(logging.WARNING, "sources.guard"):
        g.apply(Chunk("imu", "imu", np.array([0.0, 0.01, 0.02, 500.0, 0.03]), np.zeros((5, 6), np.float32)))
    assert g.dropped == {"jump": 1} and "jump" in caplog.text and "time_unit" not in caplog.text


@pytest.mark.parametrize("unit, step, fits", [("s", 33.333, "in ms they would be 0.033333 s apart"),
                                               ("ms", 33333.0, "in us they would be 0.033333 s apart")])
def test_depth_frame_times_in_another_unit_warn_with_the_unit_that_fits(tmp_path, caplog, unit, step, fits):
    """Depth at 30 Hz stamped in ms but declared in s: 33 s between frames, which no camera does."""
    np.save(tmp_path / "d.npy", np.zeros((8, 3, 4), np.uint16))
    times = "\n".join(f"{i * step:.3f}" for i in range(8)) + "\n"
    s = _session(tmp_path, [{"id": "depth", "modality": "depth", "source": "d.npy", "timestamps": "d.csv",
                             "time_unit": unit}], {"d.csv": times})
    with caplog.at_level(logging.WARNING):
        frames = sum(len(c.t) for c in open_source(s.stream("depth")))
    assert frames == 8, "a warning only: every frame is still read"
    assert "session 'edge' stream 'depth'" in caplog.text and "d.csv" in caplog.text and fits in caplog.text


def test_plausible_frame_times_give_no_unit_hint(tmp_path, caplog):
    np.save(tmp_path / "d.npy", np.zeros((8, 3, 4), np.uint16))
    s = _session(tmp_path, [{"id": "depth", "modality": "depth", "source": "d.npy", "timestamps": "d.csv",
                             "time_unit": "ms"}], {"d.csv": "\n".join(str(33 * i) for i in range(8)) + "\n"})
    with caplog.at_level(logging.WARNING):
        assert sum(len(c.t) for c in open_source(s.stream("depth"))) == 8
    assert "time_unit" not in caplog.text
