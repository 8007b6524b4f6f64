"""session.yaml v1 validation: good sessions load, every kind of bad one is a ConfigError
that names what is wrong, and no input raises anything else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sources.errors import ConfigError
from sources.session import FORMAT, load_session, session_from_dict

IMU_COLS = {"t": "t", "ax": "ax", "ay": "ay", "az": "az", "gx": "gx", "gy": "gy", "gz": "gz"}


def _make_files(root: Path) -> None:
    (root / "video.mp4").write_bytes(b"not decoded by load_session")
    (root / "imu.csv").write_text("t,row_type,ax,ay,az,gx,gy,gz\n")
    (root / "depth").mkdir()
    (root / "depth" / "000.png").write_bytes(b"")
    (root / "depth" / "timestamps.csv").write_text("t\n0\n")
    (root / "depth.npy").write_bytes(b"")
    (root / "depth_t.npy").write_bytes(b"")
    (root / "text.jsonl").write_text("")


def _good_doc() -> dict:
    return {
        "format": FORMAT,
        "name": "kitchen-0001",
        "streams": [
            {"id": "cam", "modality": "vision", "source": "video.mp4"},
            {"id": "mic", "modality": "audio", "source": "video.mp4", "track": 0},
            {"id": "imu", "modality": "imu", "source": "imu.csv", "columns": dict(IMU_COLS), "time_unit": "us",
             "accel_unit": "g", "gyro_unit": "deg/s", "offset": -1403715273.26, "where": {"row_type": "imu"}},
            {"id": "depth", "modality": "depth", "source": "depth/", "timestamps": "depth/timestamps.csv",
             "depth_unit": "mm"},
            {"id": "depth2", "modality": "depth", "source": "depth.npy"},
            {"id": "therm", "modality": "thermal", "source": "video.mp4"},
            {"id": "cap", "modality": "text", "source": "text.jsonl", "offset": 1},
        ],
    }


def _write(root: Path, doc: object) -> Path:
    _make_files(root)
    p = root / "session.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


def test_valid_session_loads_with_resolved_paths_units_and_offsets(tmp_path: Path) -> None:
    _write(tmp_path, _good_doc())
    s = load_session(tmp_path)
    assert s.name == "kitchen-0001"
    assert [x.id for x in s.streams] == ["cam", "mic", "imu", "depth", "depth2", "therm", "cap"]
    imu = s.stream("imu")
    assert imu.source == (tmp_path / "imu.csv").resolve()
    assert (imu.time_unit, imu.accel_unit, imu.gyro_unit) == ("us", "g", "deg/s")
    assert imu.offset == -1403715273.26
    assert dict(imu.columns) == IMU_COLS and imu.where == (("row_type", "imu"),)
    assert s.stream("depth").timestamps == (tmp_path / "depth" / "timestamps.csv").resolve()
    assert s.stream("depth").kind == "png_dir"
    assert s.stream("depth2").timestamps == (tmp_path / "depth_t.npy").resolve()  # companion file
    assert s.stream("therm").kind == "media"
    assert s.stream("cap").offset == 1.0 and s.stream("cap").session == "kitchen-0001"
    assert s.stream("cam").time_unit == "s" and s.stream("cam").offset == 0.0


def test_yaml_file_path_and_folder_path_both_load(tmp_path: Path) -> None:
    p = _write(tmp_path, _good_doc())
    assert load_session(p) == load_session(tmp_path)


def test_ego4d_preset_expands_to_its_columns_and_units(tmp_path: Path) -> None:
    doc = _good_doc()
    doc["streams"] = [{"id": "imu", "modality": "imu", "source": "imu.csv", "preset": "ego4d"}]
    _write(tmp_path, doc)
    (tmp_path / "imu.csv").write_text("canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z\n")
    imu = load_session(tmp_path).stream("imu")
    assert dict(imu.columns)["t"] == "canonical_timestamp_ms"
    assert dict(imu.columns)["gz"] == "gyro_z"
    assert (imu.time_unit, imu.accel_unit, imu.gyro_unit) == ("ms", "m/s^2", "rad/s")


def test_session_from_dict_validates_inline_sessions(tmp_path: Path) -> None:
    _make_files(tmp_path)
    s = session_from_dict(_good_doc(), tmp_path)
    assert len(s.streams) == 7
    bad = _good_doc()
    bad["streams"][0]["fps"] = 30
    with pytest.raises(ConfigError, match=r"<inline session>.*stream 'cam'.*unknown key 'fps'"):
        session_from_dict(bad, tmp_path)


def _mutate(fn):
    doc = _good_doc()
    fn(doc)
    return doc


BAD_CASES = [
    ("malformed_yaml", "format: [unclosed\n", r"malformed YAML"),
    ("not_a_mapping", "- just\n- a list\n", r"expected a mapping"),
    ("wrong_format", _mutate(lambda d: d.update(format="bindstream.session/2")), r"key 'format'"),
    ("bad_name", _mutate(lambda d: d.update(name="kitchen 01/..")), r"key 'name'"),
    ("unknown_top_key", _mutate(lambda d: d.update(fps=3)), r"unknown key 'fps'"),
    ("no_streams", _mutate(lambda d: d.update(streams=[])), r"key 'streams'"),
    ("duplicate_ids", _mutate(lambda d: d["streams"].append(dict(d["streams"][0]))), r"stream id 'cam' is used twice"),
    ("bad_stream_id", _mutate(lambda d: d["streams"][0].update(id="c/am")), r"streams\[0\]: key 'id'"),
    ("unknown_stream_key", _mutate(lambda d: d["streams"][2].update(rate=200)), r"stream 'imu': unknown key 'rate'"),
    ("key_of_other_modality", _mutate(lambda d: d["streams"][0].update(depth_unit="mm")), r"stream 'cam': unknown key 'depth_unit'"),
    ("unknown_modality", _mutate(lambda d: d["streams"][0].update(modality="lidar")), r"stream 'cam': key 'modality'"),
    ("offset_wrong_type", _mutate(lambda d: d["streams"][0].update(offset="1s")), r"stream 'cam': key 'offset'"),
    ("offset_bool", _mutate(lambda d: d["streams"][0].update(offset=True)), r"key 'offset'"),
    ("offset_not_finite", _mutate(lambda d: d["streams"][0].update(offset=float("nan"))), r"key 'offset'"),
    ("track_negative", _mutate(lambda d: d["streams"][1].update(track=-1)), r"stream 'mic': key 'track'"),
    ("unknown_time_unit", _mutate(lambda d: d["streams"][2].update(time_unit="sec")), r"stream 'imu': key 'time_unit'"),
    ("unknown_accel_unit", _mutate(lambda d: d["streams"][2].update(accel_unit="ft/s^2")), r"key 'accel_unit'"),
    ("unknown_gyro_unit", _mutate(lambda d: d["streams"][2].update(gyro_unit="rpm")), r"key 'gyro_unit'"),
    ("unknown_depth_unit", _mutate(lambda d: d["streams"][3].update(depth_unit="cm")), r"stream 'depth': key 'depth_unit'"),
    ("unknown_preset", _mutate(lambda d: d["streams"][2].update(preset="euroc")), r"stream 'imu'.*'columns' or 'preset'"),
    ("imu_without_columns", _mutate(lambda d: d["streams"][2].pop("columns")), r"stream 'imu'.*'columns' or 'preset'"),
    ("imu_role_missing", _mutate(lambda d: d["streams"][2]["columns"].pop("gz")), r"role 'gz' is missing"),
    ("imu_unknown_role", _mutate(lambda d: d["streams"][2]["columns"].update(mx="mx")), r"unknown key 'mx'"),
    ("where_not_mapping", _mutate(lambda d: d["streams"][2].update(where="imu")), r"key 'where'"),
    ("missing_source_key", _mutate(lambda d: d["streams"][0].pop("source")), r"stream 'cam': key 'source' is missing"),
    ("missing_file", _mutate(lambda d: d["streams"][0].update(source="nope.mp4")), r"stream 'cam'.*'nope.mp4' does not exist"),
    ("escape_dotdot", _mutate(lambda d: d["streams"][0].update(source="../video.mp4")), r"stream 'cam'.*outside the session folder"),
    ("escape_absolute", _mutate(lambda d: d["streams"][0].update(source="/etc/hostname")), r"stream 'cam'.*absolute"),
    ("timestamps_escape", _mutate(lambda d: d["streams"][3].update(timestamps="../t.csv")), r"stream 'depth': key 'timestamps'.*outside"),
    ("png_dir_without_timestamps", _mutate(lambda d: d["streams"][3].pop("timestamps")), r"stream 'depth': key 'timestamps' is missing"),
    ("depth_from_video", _mutate(lambda d: d["streams"][3].update(source="video.mp4")), r"stream 'depth'.*16-bit PNGs or a .npy"),
    ("timestamps_for_video", _mutate(lambda d: d["streams"][5].update(timestamps="depth/timestamps.csv")),
     r"stream 'therm': key 'timestamps'"),
    ("vision_from_folder", _mutate(lambda d: d["streams"][0].update(source="depth")), r"stream 'cam'.*expected a file"),
]


@pytest.mark.parametrize("doc,pattern", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_invalid_session_is_a_config_error_naming_the_problem(tmp_path: Path, doc: object, pattern: str) -> None:
    root = tmp_path / "sess"
    root.mkdir()
    (tmp_path / "video.mp4").write_bytes(b"")  # target of the ../ escapes: exists, still refused
    (tmp_path / "t.csv").write_text("t\n0\n")
    yaml_path = _write(root, doc)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_session(root)
    assert str(yaml_path) in str(err.value)


def test_symlink_pointing_outside_the_session_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "sess"
    root.mkdir()
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"")
    doc = _good_doc()
    _write(root, doc)
    os.symlink(outside, root / "link.mp4")
    doc["streams"][0]["source"] = "link.mp4"
    (root / "session.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"stream 'cam'.*link.mp4 resolves to .*secret.mp4, outside"):
        load_session(root)


def test_symlinked_png_inside_a_frame_folder_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "sess"
    root.mkdir()
    (tmp_path / "elsewhere.png").write_bytes(b"")
    _write(root, _good_doc())
    os.symlink(tmp_path / "elsewhere.png", root / "depth" / "001.png")
    with pytest.raises(ConfigError, match=r"stream 'depth'.*001.png resolves to .*outside"):
        load_session(root)


def test_symlink_that_stays_inside_is_accepted(tmp_path: Path) -> None:
    doc = _good_doc()
    _write(tmp_path, doc)
    os.symlink(tmp_path / "video.mp4", tmp_path / "alias.mp4")
    doc["streams"][0]["source"] = "alias.mp4"
    (tmp_path / "session.yaml").write_text(yaml.safe_dump(doc))
    assert load_session(tmp_path).stream("cam").source == (tmp_path / "video.mp4").resolve()


def test_missing_session_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="session file not found"):
        load_session(tmp_path)


# --- property-based: nothing but ConfigError escapes validation ---------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.sampled_from(["video.mp4", "../video.mp4", "depth", "depth/", "imu.csv", "s", "ms", "g",
                                      "deg/s", "mm", "ego4d", "vision", "audio", "imu", "depth", "thermal", "text",
                                      "/etc/passwd", "depth.npy", "depth/timestamps.csv", ""]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)
_stream_keys = st.sampled_from(["id", "modality", "source", "offset", "track", "columns", "preset", "time_unit",
                                "accel_unit", "gyro_unit", "where", "timestamps", "depth_unit", "bogus"])
_streams = st.lists(st.dictionaries(_stream_keys, _values, max_size=7), max_size=3)
_docs = st.one_of(
    _values,
    st.fixed_dictionaries({"format": st.sampled_from([FORMAT, "x"]), "name": st.sampled_from(["ok", "bad name", 3]),
                           "streams": _streams}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_docs)
def test_arbitrary_documents_raise_only_config_error(tmp_path: Path, doc: object) -> None:
    if not (tmp_path / "video.mp4").exists():
        _make_files(tmp_path)
    try:
        session_from_dict(doc, tmp_path)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(["{", "a: !!python/object:os.system x", "a: *x",
                                                              "t: 2001-13-45", "[" * 200, "\x00", "- - - -"])))
def test_arbitrary_yaml_text_raises_only_config_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "session.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_session(tmp_path)
    except ConfigError:
        pass
