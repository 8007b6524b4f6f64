"""Bad input, refused clearly, counted, without effect on other streams.

Complements tests/test_sources.py and tests/test_session.py (per-reader and per-file cases
live there: zero-length media, truncated/corrupt video, missing track, missing columns,
NaN/non-numeric IMU rows, 8-bit depth PNG, malformed session YAML, symlinks). Here: the
stream guard (clock jumps, non-finite data), frame-level limits, property tests of the file
parsers not covered yet, and a broken session replayed through the real Ray graph.
"""

from __future__ import annotations

import collections
import logging
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import DEFAULTS, parse_config
from sources.demo import write_demo_session
from sources.errors import ConfigError, SourceError
from sources.guard import StreamGuard
from sinks.protocol import embedding_array
from sources.session import FORMAT, load_session
from sources.base import Chunk
from sources.frames import read_timestamps
from sources.replay import open_source

ray = pytest.importorskip("ray")


def _chunk(modality: str, t, data=None) -> Chunk:
    t = np.asarray(t, dtype=np.float64)
    if data is None:
        data = np.zeros((len(t), 6), np.float32) if modality == "imu" else np.zeros(len(t), np.float32)
    return Chunk("s1", modality, t, data)


# -- the stream guard ------------------------------------------------------------------------

def test_a_wild_timestamp_is_dropped_and_counted_and_the_stream_goes_on(caplog):
    g = StreamGuard("sess", "imu", "imu", max_gap_s=10)
    with caplog.at_level(logging.WARNING, "sources.guard"):
        out = g.apply(_chunk("imu", [0.0, 0.1, 1e9, 0.2, 0.3]))
    assert out.t.tolist() == [0.0, 0.1, 0.2, 0.3] and out.data.shape == (4, 6)
    assert g.dropped == {"jump": 1}
    assert "session 'sess' stream 'imu'" in caplog.text and "jump" in caplog.text and "1000000000.000" in caplog.text


def test_a_real_clock_jump_is_followed_after_confirm_s_of_samples_at_the_stream_s_rate():
    g = StreamGuard("sess", "imu", "imu", max_gap_s=10)
    a = g.apply(_chunk("imu", np.arange(0.0, 1.0, 0.1)))
    resumed = 500.0 + np.arange(0.0, 3.0, 0.1)  # the recording resumed 500 s later, same rate
    b = g.apply(_chunk("imu", resumed))
    assert len(a) == 10
    # confirmed once the run spans CONFIRM_S (2 s): the samples before are the price
    assert b.t[0] == pytest.approx(502.0) and b.t.tolist() == resumed[20:].tolist()
    assert g.dropped == {"jump": 20}


def test_non_finite_audio_imu_thermal_samples_are_dropped_but_depth_holes_are_kept():
    audio = StreamGuard("sess", "mic", "audio")
    out = audio.apply(_chunk("audio", [0, 1, 2, 3], np.array([0.1, np.nan, np.inf, 0.2], np.float32)))
    assert out.data.tolist() == pytest.approx([0.1, 0.2]) and audio.dropped == {"non_finite_data": 2}
    thermal = StreamGuard("sess", "th", "thermal")
    frames = np.zeros((2, 4, 4), np.float32)
    frames[1, 2, 2] = np.nan
    assert len(thermal.apply(_chunk("thermal", [0, 1], frames))) == 1
    depth = StreamGuard("sess", "d", "depth")
    assert len(depth.apply(_chunk("depth", [0, 1], frames))) == 2  # NaN depth = "no reading"


def test_text_is_never_dropped_for_gaps_and_off_means_off():
    text = StreamGuard("sess", "cap", "text", max_gap_s=10)
    out = text.apply(Chunk("cap", "text", np.array([0.0, 1e6, 5.0]), ["a", "b", "c"]))
    assert out.data == ["a", "b", "c"] and text.dropped == {}
    off = StreamGuard("sess", "imu", "imu", max_gap_s=0)
    assert len(off.apply(_chunk("imu", [0.0, 1e9, 1.0]))) == 3 and off.dropped == {}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.one_of(st.floats(-1e3, 1e3), st.sampled_from([1e12, -1e12, math.nan, math.inf])),
                      max_size=20), max_size=8),
    st.floats(0.5, 100),
    st.data(),
)
def test_property_guard_keeps_or_counts_every_sample_and_never_lets_nan_data_through(chunks, gap, data):
    g = StreamGuard("sess", "imu", "imu", max_gap_s=gap)
    n_in = n_out = 0
    for ts in chunks:
        vals = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 1.0, math.nan]), min_size=len(ts),
                                             max_size=len(ts))), np.float32)
        payload = np.repeat(vals[:, None], 6, axis=1)
        out = g.apply(_chunk("imu", ts, payload))
        n_in += len(ts)
        n_out += len(out)
        assert len(out.t) == len(out.data)
        assert np.isfinite(out.data).all()
    assert n_in == n_out + sum(g.dropped.values())


class _SampleBySample(StreamGuard):
    _clock = StreamGuard._clock_each  # no whole-chunk fast path


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.one_of(st.floats(-100, 100), st.sampled_from([1e6, -1e6, math.nan])), max_size=30),
             max_size=10),
    st.floats(0.5, 100),
)
def test_property_the_guard_s_fast_path_keeps_exactly_what_the_sample_rule_keeps(chunks, gap):
    fast = StreamGuard("sess", "mic", "audio", max_gap_s=gap)
    slow = _SampleBySample("sess", "mic", "audio", max_gap_s=gap)
    for ts in chunks:
        ts = sorted(ts, key=lambda v: (math.isnan(v), v)) if len(ts) % 2 else ts  # runs in order, and not
        a = fast.apply(_chunk("mic", ts, np.zeros(len(ts), np.float32)))
        b = slow.apply(_chunk("mic", ts, np.zeros(len(ts), np.float32)))
        np.testing.assert_array_equal(a.t, b.t)  # NaN times pass through to the aligner in both
    assert fast.dropped == slow.dropped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.001, 0.5), min_size=2, max_size=60), st.sets(st.integers(1, 59)),
       st.sampled_from([1e9, -1e9, 3600.0]), st.integers(1, 7))
def test_property_isolated_wild_timestamps_never_get_through(steps, spikes, offset, chunk_len):
    t = np.cumsum(steps)
    spikes = sorted(i for i in spikes if i < len(t) and i - 1 not in spikes)  # isolated, never the first
    t[spikes] += offset
    g = StreamGuard("sess", "imu", "imu", max_gap_s=60)
    kept = np.concatenate([g.apply(_chunk("imu", t[i:i + chunk_len])).t for i in range(0, len(t), chunk_len)])
    assert kept.tolist() == np.delete(t, spikes).tolist()
    assert g.dropped.get("jump", 0) == len(spikes)


# -- frames ----------------------------------------------------------------------------------

def _session(root: Path, streams: list[dict], files: dict[str, bytes | str]) -> object:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "session.yaml").write_text(yaml.safe_dump({"format": FORMAT, "name": "bad", "streams": streams}))
    return load_session(root)


def _png(width: int, height: int, depth16: bool = True, pixels: bytes | None = None) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    bpp = 2 if depth16 else 1
    if pixels is None:
        pixels = b"".join(b"\x00" + b"\x01" * (width * bpp) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16 if depth16 else 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def test_png_declaring_absurd_dimensions_is_refused_before_decoding(tmp_path):
    # 100000 x 100000 16-bit would be 20 GB decoded; the file is a few bytes.
    s = _session(tmp_path / "s", [{"id": "depth", "modality": "depth", "source": "d", "timestamps": "t.csv"}],
                 {"d/0.png": _png(4, 4), "d/1.png": _png(100_000, 100_000, pixels=b"\x00"), "t.csv": "0\n1\n"})
    got = []
    with pytest.raises(SourceError, match=r"stream 'depth': frame .*1\.png refused before decoding: "
                                          r"its header says 100000x100000, over the limit.*max_pixels"):
        for c in open_source(s.stream("depth"), max_pixels=8192 * 8192):
            got.append(c)
    assert sum(len(c) for c in got) == 1  # the good frame before it still went out


def test_frame_size_changing_mid_stream_names_the_frame(tmp_path):
    s = _session(tmp_path / "s", [{"id": "depth", "modality": "depth", "source": "d", "timestamps": "t.csv"}],
                 {"d/0.png": _png(4, 4), "d/1.png": _png(8, 4), "t.csv": "0\n1\n"})
    with pytest.raises(SourceError, match=r"stream 'depth': frame 1\.png is 8x4, earlier frames are 4x4"):
        list(open_source(s.stream("depth")))


# -- parsers of file input: arbitrary bytes give data or a clear error, nothing else ---------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("0123456789.,-e#xn a\n\t\"")), max_size=200))
def test_property_timestamps_file_gives_finite_times_or_source_error(tmp_path, text):
    s = _session(tmp_path / "s", [{"id": "depth", "modality": "depth", "source": "d", "timestamps": "t.csv"}],
                 {"d/0.png": _png(2, 2), "t.csv": text})
    try:
        names, t = read_timestamps(s.stream("depth"))
    except SourceError as exc:
        assert "stream 'depth'" in str(exc)
        return
    assert np.isfinite(t).all() and len(t) > 0
    assert names is None or len(names) == len(t)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_property_text_jsonl_gives_chunks_or_source_error(tmp_path, body):
    s = _session(tmp_path / "s", [{"id": "cap", "modality": "text", "source": "c.jsonl"}], {"c.jsonl": body})
    try:
        chunks = list(open_source(s.stream("cap")))
    except SourceError as exc:
        assert "stream 'cap'" in str(exc)
        return
    for c in chunks:
        assert len(c.t) == len(c.data) and all(isinstance(x, str) for x in c.data)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                       max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: _values for k in DEFAULTS}), st.sampled_from(sorted(DEFAULTS)),
       st.dictionaries(st.sampled_from(["rate", "hop", "max_batch", "endpoint", "curve", "max_gap_s", "x"]), _values))
def test_property_run_config_of_any_shape_raises_only_config_error(doc, key, inner):
    doc = dict(doc)
    doc.setdefault("sessions", ["s"])
    if isinstance(DEFAULTS[key], dict):
        doc[key] = inner
    try:
        parse_config(doc)
    except ConfigError as exc:
        assert str(exc)


# -- a broken session through the real graph --------------------------------------------------

def _break_session(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    (dst / "session.yaml").write_text((dst / "session.yaml").read_text().replace("name: good", "name: bad"))
    lines = (dst / "imu.csv").read_text().splitlines()
    imu_rows = [i for i, line in enumerate(lines) if ",imu," in line]

    def set_field(i: int, col: int, value: str) -> None:
        cells = lines[i].split(",")
        cells[col] = value
        lines[i] = ",".join(cells)

    set_field(imu_rows[10], 2, "nan")  # acc_x_g
    set_field(imu_rows[20], 5, "inf")  # gyr_x_dps
    set_field(imu_rows[30], 3, "oops")
    set_field(imu_rows[40], 0, str(int(lines[imu_rows[40]].split(",")[0]) + 10**9))  # +11.6 days
    lines.insert(imu_rows[50] + 1, lines[imu_rows[50]])  # a duplicated row
    (dst / "imu.csv").write_text("\n".join(lines) + "\n")
    # an 8-bit PNG where 16-bit depth is declared, half way through the depth stream
    pngs = sorted((dst / "depth").glob("*.png"))
    (pngs[len(pngs) // 2]).write_bytes(_png(8, 8, depth16=False))


def test_broken_streams_are_named_counted_and_the_others_complete_through_the_graph(tmp_path, ray_cluster):
    from test_pipeline_e2e import _config, _expected_windows, _replay

    good = write_demo_session(tmp_path / "good", seconds=4.0, seed=7, name="good")
    _break_session(good, tmp_path / "bad")
    cfg = _config([tmp_path / "bad"])
    result, messages = _replay([tmp_path / "bad"])
    assert result.exit_code == 3
    (summary,) = result.sessions
    assert list(summary["errors"]) == ["depth"]
    assert "session 'bad' stream 'depth'" in summary["errors"]["depth"]
    assert "expected a 16-bit" in summary["errors"]["depth"] and ".png" in summary["errors"]["depth"]
    dropped = summary["dropped"]
    # nan and inf rows, the 'oops' row, the row 11.6 days ahead, the repeated row
    want = {"imu:non_finite": 2, "imu:non_numeric": 1, "imu:jump": 1, "imu:duplicate": 1}
    assert {k: dropped.get(k) for k in want} == want, dropped

    emb = [m for m in messages if m.topic.startswith("emb/")]
    assert all(np.isfinite(embedding_array(m)).all() for m in emb), "NaN reached a published embedding"
    keys = [(m.payload["modality"], m.payload["window"]) for m in emb]
    assert len(keys) == len(set(keys))
    # The same session unbroken: the other streams publish exactly its windows; the clock
    # jump did not stretch the session (no extra windows).
    _, windows = _expected_windows(good, cfg)
    expected = collections.defaultdict(set)
    for w in windows:
        for it in w.items:
            expected[it.modality].add(it.window)
    got = collections.defaultdict(set)
    for modality, window in keys:
        got[modality].add(window)
    assert summary["windows"] == len(windows)
    for modality in ("vision", "audio", "imu", "thermal", "text"):
        assert got[modality] == expected[modality], modality
    assert got["depth"] < expected["depth"]
