"""Edges of file input found by probing (IMU CSVs, captions): each is a counted drop or a clear
message naming the session, stream and file, never a silent loss, a leaked warning or a hang."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from sources.errors import ConfigError
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
