"""Replay sources on real recordings (../shared/fixtures/real) and on generated files:
layouts, units, session-clock times, dropped-row accounting, and damaged media."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media_files import faststart_cut

from sources.errors import ConfigError, SourceError
from sources.session import FORMAT, StreamSpec, load_session
from sources.base import AUDIO_RATE, frame_values
from sources.replay import open_source

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
XIO_COLUMNS = {"t": "Timestamp (us)", "ax": "Accelerometer X (g)", "ay": "Accelerometer Y (g)",
               "az": "Accelerometer Z (g)", "gx": "Gyroscope X (deg/s)", "gy": "Gyroscope Y (deg/s)",
               "gz": "Gyroscope Z (deg/s)"}


def _real(name: str) -> Path:
    p = REAL / name
    if not p.is_file():
        pytest.skip(f"real fixture {p} not available (../shared absent)")
    return p


def _session(root: Path, streams: list[dict], files: dict[str, Path | bytes | str] | None = None):
    """Write files and a session.yaml into ``root`` and load it."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in (files or {}).items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dst)
        elif isinstance(content, bytes):
            dst.write_bytes(content)
        else:
            dst.write_text(content)
    (root / "session.yaml").write_text(yaml.safe_dump({"format": FORMAT, "name": "t-1", "streams": streams}))
    return load_session(root)


def _drain(spec: StreamSpec, **opts):
    src = open_source(spec, **opts)
    chunks = list(src)
    return src, chunks


def _png16(path: Path, img: np.ndarray, fmt: str = "gray16be") -> None:
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = img.shape[1], img.shape[0], fmt
    frame = av.VideoFrame.from_ndarray(img, format=fmt)
    path.write_bytes(b"".join(bytes(p) for p in cc.encode(frame) + cc.encode(None)))


# --- real recordings -----------------------------------------------------------------------


def test_real_video_decodes_every_frame_downscaled_to_short_side_224(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "cam", "modality": "vision", "source": "v.mp4", "offset": 100.0}],
                 {"v.mp4": _real("realshort.mp4")})
    _, chunks = _drain(s.stream("cam"), chunk_seconds=0.5)
    frames = np.concatenate([c.data for c in chunks])
    t = np.concatenate([c.t for c in chunks])
    assert frames.shape == (36, 224, 298, 3) and frames.dtype == np.uint8  # 320x240 -> 298x224 (even)
    assert t[0] == pytest.approx(100.0) and t[-1] == pytest.approx(100.0 + 35 * 1499 / 45000, abs=1e-6)
    assert np.all(np.diff(t) > 0)
    assert all(c.t[-1] - c.t[0] < 0.5 for c in chunks) and len(chunks) == 3
    assert frames.std() > 10  # a real picture, not a constant frame
    # each chunk names the time of the frame that closed it: the aligner need not wait for it
    assert [c.passed for c in chunks[:-1]] == [c.t[0] for c in chunks[1:]] and chunks[-1].passed is None


def test_real_audio_track_of_mp4_resamples_to_16k_mono(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "mic", "modality": "audio", "source": "v.mp4"}], {"v.mp4": _real("realshort.mp4")})
    _, chunks = _drain(s.stream("mic"))
    pcm = np.concatenate([c.data for c in chunks])
    t = np.concatenate([c.t for c in chunks])
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert len(chunks[0]) == AUDIO_RATE  # one second per chunk
    assert abs(len(pcm) / AUDIO_RATE - 1.17) < 0.05
    assert np.allclose(np.diff(t), 1 / AUDIO_RATE)
    assert np.abs(pcm).max() <= 1.0 and pcm.std() > 1e-4
    assert [c.passed for c in chunks[:-1]] == pytest.approx([c.t[0] for c in chunks[1:]], abs=1e-9)
    assert chunks[-1].passed == pytest.approx(t[-1] + 1 / AUDIO_RATE)


def test_real_wav_speech_is_resampled_and_offset(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "speech", "modality": "audio", "source": "s.wav", "offset": 5.0}],
                 {"s.wav": _real("speech_front_center.wav")})
    _, chunks = _drain(s.stream("speech"))
    pcm = np.concatenate([c.data for c in chunks])
    assert chunks[0].t[0] == pytest.approx(5.0)
    n48 = av.open(str(_real("speech_front_center.wav"))).streams.audio[0].duration  # samples at 48 kHz
    assert abs(len(pcm) - n48 / 3) <= 64
    assert np.abs(pcm).max() > 0.05  # speech is audible


def test_real_xio3_imu_converts_us_g_and_deg_per_s(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "imu", "modality": "imu", "source": "i.csv", "columns": XIO_COLUMNS,
                             "time_unit": "us", "accel_unit": "g", "gyro_unit": "deg/s", "offset": -392.093562}],
                 {"i.csv": _real("imu_xio3_50hz.csv")})
    src, chunks = _drain(s.stream("imu"))
    data = np.concatenate([c.data for c in chunks])
    t = np.concatenate([c.t for c in chunks])
    assert data.shape == (500, 6) and data.dtype == np.float32 and src.dropped == {}
    # First row of the file: gyro 0.032334 deg/s ..., accel z 0.997518 g.
    assert data[0, 2] == pytest.approx(0.997518 * 9.80665, rel=1e-6)
    assert data[0, 3] == pytest.approx(0.032334 * math.pi / 180, rel=1e-5)
    assert t[0] == pytest.approx(0.0, abs=1e-9) and t[1] == pytest.approx(0.020034, abs=1e-9)
    assert 9.9 < t[-1] < 10.1
    assert np.linalg.norm(data[:, :3], axis=1).mean() == pytest.approx(9.8, abs=0.2)  # at rest: gravity only


def test_real_depth_png_as_one_frame_folder_reads_metres(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "depth", "modality": "depth", "source": "depth", "timestamps": "depth/ts.csv"}],
                 {"depth/000000.png": _real("motorcycle_depth_mm_u16.png"), "depth/ts.csv": "t\n0.25\n"})
    _, chunks = _drain(s.stream("depth"))
    (chunk,) = chunks
    assert chunk.data.shape == (1, 500, 741) and chunk.data.dtype == np.uint16 and chunk.t.tolist() == [0.25]
    d = frame_values("depth", chunk.data)  # the millimetres travel as read
    valid = d[d > 0]
    assert valid.min() == pytest.approx(2.110, abs=1e-3) and valid.max() == pytest.approx(5.017, abs=1e-3)
    assert (d == 0).any()  # pixels without ground truth stay "no reading"


# --- generated files -----------------------------------------------------------------------


def _imu_csv(rows: list[str]) -> str:
    return "\n".join(["time_ms,row_type,ax,ay,az,gx,gy,gz"] + rows) + "\n"


IMU_GEN = {"id": "imu", "modality": "imu", "source": "imu.csv", "time_unit": "ms", "where": {"row_type": "imu"},
           "columns": {"t": "time_ms", "ax": "ax", "ay": "ay", "az": "az", "gx": "gx", "gy": "gy", "gz": "gz"}}


def test_imu_bad_rows_are_dropped_counted_and_logged_with_line_numbers(tmp_path: Path, caplog) -> None:
    rows = ["0,imu,1,2,3,4,5,6", "5,imu,nan,2,3,4,5,6", "10,mag,x,y,z,,,", "15,imu,1,two,3,4,5,6",
            "20,imu,1,2", "25,imu,inf,2,3,4,5,6", "30,imu,1,2,3,4,5,6"]
    s = _session(tmp_path, [IMU_GEN], {"imu.csv": _imu_csv(rows)})
    with caplog.at_level(logging.WARNING):
        src, chunks = _drain(s.stream("imu"))
    data = np.concatenate([c.data for c in chunks])
    t = np.concatenate([c.t for c in chunks])
    assert t.tolist() == [0.0, 0.03]  # the 'mag' row is filtered out, not dropped
    assert data[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert src.dropped == {"non_finite": 2, "non_numeric": 1, "short_row": 1}
    assert "stream 'imu'" in caplog.text and "line 3 of imu.csv" in caplog.text and "line 5 of imu.csv" in caplog.text


def test_imu_missing_column_is_a_config_error_at_load_naming_column_file_and_the_files_columns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stream 'imu': column 'gz' missing in .*imu.csv; the file has: "
                                          r"time_ms, row_type, ax, ay, az, gx, gy$"):
        _session(tmp_path, [IMU_GEN], {"imu.csv": "time_ms,row_type,ax,ay,az,gx,gy\n0,imu,1,2,3,4,5\n"})


def test_imu_column_gone_from_a_file_changed_after_load_is_a_source_error(tmp_path: Path) -> None:
    s = _session(tmp_path, [IMU_GEN], {"imu.csv": _imu_csv(["0,imu,1,2,3,4,5,6"])})
    (tmp_path / "imu.csv").write_text("time_ms,row_type,ax,ay,az,gx,gy\n0,imu,1,2,3,4,5\n")
    with pytest.raises(SourceError, match=r"session 't-1' stream 'imu': column 'gz'.*imu.csv"):
        _drain(s.stream("imu"))


def test_imu_ego4d_preset_reads_an_ego4d_style_file(tmp_path: Path) -> None:
    csv_text = ("component_idx,component_timestamp_ms,canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z\n"
                "0,0,1000,0.1,0.2,0.3,1.0,2.0,9.8\n0,5,1005,0.1,0.2,0.3,1.0,2.0,9.8\n")
    s = _session(tmp_path, [{"id": "imu", "modality": "imu", "source": "imu.csv", "preset": "ego4d", "offset": -1.0}],
                 {"imu.csv": csv_text})
    _, chunks = _drain(s.stream("imu"))
    assert chunks[0].t.tolist() == pytest.approx([0.0, 0.005])
    assert chunks[0].data[0].tolist() == pytest.approx([1.0, 2.0, 9.8, 0.1, 0.2, 0.3])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=5),
                                        st.sampled_from(["imu", "nan", "-inf", "1e400", ""])),
                              max_size=9), max_size=12),
       header=st.one_of(st.just("time_ms,row_type,ax,ay,az,gx,gy,gz"), st.text(max_size=30)))
def test_imu_parser_on_arbitrary_csv_yields_finite_rows_or_source_error(tmp_path: Path, body, header) -> None:
    text = header + "\n" + "\n".join(",".join(str(c) for c in row) for row in body)
    path = tmp_path / "imu.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    spec = StreamSpec(id="imu", modality="imu", source=path, session="h", time_unit="ms", where=(("row_type", "imu"),),
                      columns=tuple((r, c) for r, c in zip(("t", "ax", "ay", "az", "gx", "gy", "gz"),
                                                           ("time_ms", "ax", "ay", "az", "gx", "gy", "gz"))))
    try:
        src = open_source(spec)
        for c in src:
            assert c.data.dtype == np.float32 and c.data.shape == (len(c.t), 6)
            assert np.isfinite(c.t).all()
    except SourceError:
        pass


def test_thermal_png_folder_scales_8_and_16_bit_to_unit_range(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "th8").mkdir(parents=True)
    (root / "th16").mkdir()
    img8 = np.array([[0, 255], [51, 102]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    img16 = (img8.astype(np.uint16) * 257)
    for k in range(3):
        _png16(root / "th8" / f"{k}.png", img8, "gray")
        _png16(root / "th16" / f"{k}.png", img16)
    # one-column timestamps in ms, and the frame,t form with a header
    s = _session(root, [
        {"id": "a", "modality": "thermal", "source": "th8", "timestamps": "t8.csv", "time_unit": "ms"},
        {"id": "b", "modality": "thermal", "source": "th16", "timestamps": "t16.csv"},
    ], {"t8.csv": "0\n100\n200\n", "t16.csv": "frame,t\n2.png,0.3\n0.png,0.1\n"})
    _, a = _drain(s.stream("a"))
    _, b = _drain(s.stream("b"))
    assert a[0].data.dtype == np.uint8 and b[0].data.dtype == np.uint16  # travel as read
    a_data = frame_values("thermal", np.concatenate([c.data for c in a]))
    assert a_data.shape == (3, 8, 8) and np.concatenate([c.t for c in a]).tolist() == pytest.approx([0, 0.1, 0.2])
    assert a_data[0, 0, 0] == 0.0 and a_data[0, 0, 7] == 1.0 and a_data[0, 7, 0] == pytest.approx(0.2)
    b_data = frame_values("thermal", np.concatenate([c.data for c in b]))
    assert np.concatenate([c.t for c in b]).tolist() == [0.3, 0.1]  # only listed frames, in file order
    assert np.allclose(b_data, a_data[:2], atol=1e-6)


def test_eight_bit_png_in_a_depth_folder_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "d").mkdir(parents=True)
    _png16(root / "d" / "0.png", np.full((4, 4), 1000, np.uint16))
    _png16(root / "d" / "1.png", np.full((4, 4), 10, np.uint8), "gray")
    s = _session(root, [{"id": "depth", "modality": "depth", "source": "d", "timestamps": "d/t.csv"}],
                 {"d/t.csv": "0\n1.5\n"})
    got = []
    with pytest.raises(SourceError, match=r"stream 'depth': depth frame .*1.png is gray, expected a 16-bit"):
        for c in open_source(s.stream("depth")):
            got.append(c)
    assert len(got) == 1 and got[0].data[0, 0, 0] == 1000  # the good frame (millimetres) came first


def test_timestamp_count_mismatch_is_a_source_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "d").mkdir(parents=True)
    _png16(root / "d" / "0.png", np.zeros((4, 4), np.uint16))
    s = _session(root, [{"id": "depth", "modality": "depth", "source": "d", "timestamps": "t.csv"}], {"t.csv": "0\n1\n"})
    with pytest.raises(SourceError, match=r"stream 'depth'.*2 times for 1 PNG"):
        open_source(s.stream("depth"))


def test_npy_depth_with_companion_times_integer_mm_and_float_m(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    np.save(root / "dmm.npy", np.full((5, 3, 4), 1500, np.uint16))
    np.save(root / "dmm_t.npy", np.arange(5) * 0.2)
    np.save(root / "dm.npy", np.full((2, 3, 4), 1.25, np.float32))
    s = _session(root, [{"id": "mm", "modality": "depth", "source": "dmm.npy", "offset": 1.0},
                        {"id": "m", "modality": "depth", "source": "dm.npy", "timestamps": "dm.csv"}],
                 {"dm.csv": "t\n0\n0.5\n"})
    _, mm = _drain(s.stream("mm"), chunk_seconds=0.5)
    assert [len(c) for c in mm] == [3, 2]
    assert np.concatenate([c.t for c in mm]).tolist() == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8])
    assert mm[0].data.dtype == np.uint16 and np.allclose(frame_values("depth", mm[0].data), 1.5)
    _, m = _drain(s.stream("m"))
    assert m[0].data.dtype == np.float32 and np.allclose(m[0].data, 1.25)


def test_text_jsonl_keeps_good_lines_and_counts_bad_ones(tmp_path: Path, caplog) -> None:
    lines = [json.dumps({"t": 0.5, "text": "hello"}), "{not json", json.dumps({"t": "soon", "text": "x"}), "",
             json.dumps([1, 2]), json.dumps({"t": 2.0, "text": 7}), json.dumps({"t": 3.0, "text": "bye", "who": "a"})]
    s = _session(tmp_path, [{"id": "cap", "modality": "text", "source": "c.jsonl", "offset": 10}],
                 {"c.jsonl": "\n".join(lines) + "\n"})
    with caplog.at_level(logging.WARNING):
        src, chunks = _drain(s.stream("cap"))
    assert [x for c in chunks for x in c.data] == ["hello", "bye"]
    assert [x for c in chunks for x in c.t.tolist()] == [10.5, 13.0]
    assert src.dropped == {"bad_json": 2, "bad_t": 1, "bad_text": 1}
    assert "stream 'cap'" in caplog.text and "line 2 of c.jsonl" in caplog.text


# --- damaged media -------------------------------------------------------------------------


def _video_spec(tmp_path: Path, data: bytes, modality: str = "vision") -> StreamSpec:
    s = _session(tmp_path, [{"id": "cam", "modality": modality, "source": "v.mp4"}], {"v.mp4": data})
    return s.stream("cam")


@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_zero_length_media_is_a_source_error_naming_stream_and_file(tmp_path: Path, modality: str) -> None:
    spec = _video_spec(tmp_path, b"", modality)
    with pytest.raises(SourceError, match=r"session 't-1' stream 'cam': cannot open .*v.mp4"):
        list(open_source(spec))


def test_truncated_mp4_without_index_is_a_source_error(tmp_path: Path) -> None:
    data = _real("realshort.mp4").read_bytes()
    spec = _video_spec(tmp_path, data[: len(data) // 2])  # index (moov) is at the end: lost
    with pytest.raises(SourceError, match=r"stream 'cam'.*v.mp4"):
        list(open_source(spec))


def test_truncated_faststart_mp4_emits_the_good_frames_then_errors(tmp_path: Path) -> None:
    # Remux with the index first, then cut: the file opens, and ends early.
    spec = _video_spec(tmp_path / "s", faststart_cut(_real("realshort.mp4"), tmp_path / "fs.mp4"))
    got = []
    with pytest.raises(SourceError, match=r"stream 'cam'.*v.mp4 is truncated"):
        for c in open_source(spec, chunk_seconds=0.25):
            got.append(c)
    n = sum(len(c) for c in got)
    assert 5 < n < 36


def test_corrupt_video_bytes_emit_what_decoded_then_raise(tmp_path: Path) -> None:
    data = bytearray(_real("realshort.mp4").read_bytes())
    for i in range(20000, 60000, 97):
        data[i] = 0xFF
    spec = _video_spec(tmp_path, bytes(data))
    got = []
    with pytest.raises(SourceError, match=r"stream 'cam'.*v.mp4"):
        for c in open_source(spec, chunk_seconds=0.1):
            got.append(c)
    assert sum(len(c) for c in got) > 0


def test_video_over_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    spec = _video_spec(tmp_path, _real("realshort.mp4").read_bytes())
    with pytest.raises(SourceError, match=r"stream 'cam'.*320x240, over the limit of 1000 pixels"):
        list(open_source(spec, max_pixels=1000))


def test_missing_track_is_a_source_error(tmp_path: Path) -> None:
    s = _session(tmp_path, [{"id": "mic", "modality": "audio", "source": "s.wav", "track": 1}],
                 {"s.wav": _real("speech_front_center.wav")})
    with pytest.raises(SourceError, match=r"stream 'mic'.*1 audio tracks, track 1 requested"):
        list(open_source(s.stream("mic")))


def test_thermal_video_is_gray_in_unit_range(tmp_path: Path) -> None:
    spec = _video_spec(tmp_path, _real("realshort.mp4").read_bytes(), "thermal")
    chunks = list(open_source(spec))
    frames = np.concatenate([c.data for c in chunks])
    assert frames.shape == (36, 240, 320) and frames.dtype == np.uint8  # luma as decoded
    frames = frame_values("thermal", frames)
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01


def test_config_errors_and_source_errors_are_distinct_types() -> None:
    assert not issubclass(SourceError, ConfigError) and issubclass(ConfigError, ValueError)
