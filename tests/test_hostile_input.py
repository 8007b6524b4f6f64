"""Hostile input, as plain policies with fake clocks: the clock-jump guard and the device
clock's outlier rule (sources/guard.py, sources/clock.py), the aligner's bound on empty
windows (pipeline/align.py), the live inputs' byte budget and frame-size rule
(sources/live/base.py), and the length limits of CSV lines and captions. The same attacks
through the real graph are in tests/test_hostile_live.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.align import MAX_EMPTY_RUN, AlignConfig, Aligner, ModalitySpan
from sources.base import Chunk
from sources.clock import NUDGE_S, OffsetEstimator, SessionClock, StreamClock, monotone
from sources.guard import CONFIRM_S, StreamGuard


def _imu(t) -> Chunk:
    t = np.asarray(t, dtype=np.float64)
    return Chunk("imu", "imu", t, np.zeros((len(t), 6), np.float32))


# -- 1. the clock guard cannot be walked away ---------------------------------------------------
def test_samples_placed_right_after_a_wild_one_never_confirm_the_jump():
    """The attack: one sample 1e6 s ahead, and a clock that places every later sample 1 us
    after it. Those bunched samples are not spaced like the stream (200 Hz): never followed."""
    g = StreamGuard("s", "imu", "imu", max_gap_s=60)
    assert len(g.apply(_imu(np.arange(0, 2, 0.005)))) == 400
    wild = 2.0 + 1e6
    bunched = wild + 1e-6 * np.arange(1, 5001)  # 25 s of the stream's samples, bunched
    out = g.apply(_imu(np.concatenate([[wild], bunched])))
    assert len(out) == 0 and g.dropped == {"jump": 5001}
    assert len(g.apply(_imu(2.0 + np.arange(0, 1, 0.005)))) == 200  # the real clock goes on


def test_a_jump_is_followed_only_by_samples_at_the_stream_s_rate_over_confirm_s():
    g = StreamGuard("s", "imu", "imu", max_gap_s=60)
    g.apply(_imu(np.arange(0, 2, 0.005)))
    too_sparse = 1000 + np.arange(0, 10, 0.5)  # 2 Hz where the stream runs at 200 Hz
    assert len(g.apply(_imu(too_sparse))) == 0
    moved = 5000 + np.arange(0, 3, 0.005)
    out = g.apply(_imu(moved))
    assert out.t[0] == pytest.approx(5000 + CONFIRM_S) and len(out) == len(moved) - int(CONFIRM_S / 0.005)


def test_a_live_stream_is_anchored_to_the_session_clock_s_present():
    now = [100.0]
    g = StreamGuard("s", "imu", "imu", max_gap_s=60, now=lambda: now[0])
    assert len(g.apply(_imu([99.0, 99.5]))) == 2
    for wild in (1e6, -1e9, 1e9):
        # even a whole run of them at the stream's rate, for longer than confirm_s
        run = wild + np.arange(0, 3 * CONFIRM_S, 0.5)
        assert len(g.apply(_imu(run))) == 0
        now[0] += 0.5
    assert len(g.apply(_imu([now[0] - 0.2, now[0] - 0.1]))) == 2
    assert g.dropped["jump"] == 3 * 12


def test_a_mapped_time_far_behind_is_left_for_the_guard_not_placed_after_the_wild_one():
    assert monotone(10.0, 10.0) == pytest.approx(10.000001)
    assert monotone(9.5, 10.0) == pytest.approx(10.000001)  # a small regression: nudged
    assert monotone(5.0, 1e6) == 5.0  # far behind a wild time: left where it is
    assert NUDGE_S == 1.0
    wall = [1000.0]
    clock = StreamClock("session", SessionClock(1000.0, wall=lambda: wall[0]))
    got = []
    for dev in (1000.1, 1000.2, 1000.3 + 1e6, 1000.4, 1000.5):
        wall[0] = dev
        got.append(clock.map(dev))
    assert got[3:] == pytest.approx([0.4, 0.5])


def test_a_wild_device_stamp_is_an_outlier_and_a_device_clock_reset_is_followed_after_confirm_s():
    est = OffsetEstimator()
    for i in range(400):
        est.update(500.0 + i * 0.01, 10.0 + i * 0.01)  # offset -490
    assert est.offset(504.0) == pytest.approx(-490, abs=1e-3)
    est.update(504.0 + 1e6, 14.0)  # one wild stamp
    assert est.offset(504.01) == pytest.approx(-490, abs=1e-3) and est.outliers == 1
    # the device clock resets to 0: outliers until 2 s of arrival time agree, then followed
    for i in range(300):
        est.update(i * 0.01, 14.0 + i * 0.01)
    assert est.resets == 1 and est.offset(3.0) == pytest.approx(14.0, abs=1e-3)


def test_a_clock_that_leaps_costs_at_most_max_empty_run_empty_windows_and_no_time():
    al = Aligner("s", {"imu": "imu"}, AlignConfig(hop=0.25, spans={"imu": ModalitySpan(span=0.5)}))
    out = al.push(_imu(np.arange(0, 2, 0.005)))
    started = time.perf_counter()
    out += al.push(_imu(1e9 + np.arange(0, 2, 0.005)))  # a leap the guard confirmed
    out += al.end_stream("imu")
    assert time.perf_counter() - started < 2.0
    empty = [w for w in out if not w.items]
    assert len(empty) <= MAX_EMPTY_RUN
    assert al.dropped[("imu", "empty_windows")] > 1e9 / 0.25 - MAX_EMPTY_RUN - 20
    assert sum(1 for w in out if w.items) >= 15  # the data on both sides of the leap


# -- 2. a byte budget between the socket and the aligner ----------------------------------------
def test_the_inbox_holds_at_most_its_budget_drops_the_newest_and_always_takes_one():
    from sources.live.inbox import Inbox

    box = Inbox(100)
    assert box.put("a", 60) and box.put("b", 40) and not box.put("c", 1)
    assert box.bytes == 100 and box.peak == 100
    assert box.get(0.01) == "a" and box.get(0.01) == "b" and box.get(0.01) is None
    assert box.put("huge", 500)  # empty: taken, so a message up to max_bytes still passes
    assert not box.put("d", 1)


def test_thinning_frames_over_the_budget_leaves_every_window_unchanged():
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, 800))  # 80 frames a second, jittered
    frames = rng.integers(0, 5000, (len(t), 8, 8)).astype(np.uint16)

    def windows(cap):
        al = Aligner("s", {"d": "depth"}, AlignConfig(hop=0.25, max_buffer_bytes=cap))
        out = []
        for i in range(0, len(t), 20):
            out += al.push(Chunk("d", "depth", t[i:i + 20], frames[i:i + 20]))
        out += al.end_stream("d")
        return al, [(w.index, it.t_start, it.payload.tobytes()) for w in out for it in w.items]

    plain, thinned = windows(None), windows(1024)
    assert thinned[1] == plain[1] and len(plain[1]) == 40
    assert thinned[0].dropped[("d", "thinned")] > 600
    assert plain[0].dropped == {}


# -- 4. frames that change size -------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["vision", "depth"])
def test_a_live_frame_of_another_size_is_rescaled_to_the_stream_s_first_size(modality):
    from sources.live.base import LiveSource
    from sources.session import StreamSpec

    class Frames(LiveSource):
        def _samples(self):
            for i, shape in enumerate([(240, 320), (480, 640), (100, 90), (240, 320)]):
                img = np.full(shape + ((3,) if modality == "vision" else ()), 7, np.uint8 if modality == "vision"
                              else np.uint16)
                yield float(i), img

    spec = StreamSpec(id="cam", modality=modality, source=None, live="zmq", clock="arrival")
    src = Frames(spec, SessionClock(0.0), chunk_seconds=60)
    (chunk,) = list(src)
    assert chunk.data.shape[0] == 4 and src.resized == 2
    assert (chunk.data == 7).all()


# -- 5. silent costs: huge CSV lines and captions --------------------------------------------------
def test_a_huge_imu_csv_line_is_dropped_and_counted_without_being_loaded(tmp_path):
    import tracemalloc

    from sources.imu import ImuCsvSource
    from sources.session import IMU_ROLES, StreamSpec

    path = tmp_path / "imu.csv"
    cols = ["t", "ax", "ay", "az", "gx", "gy", "gz"]
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        f.write("0.00,0,0,9.8,0,0,0\n")
        f.write("1," * (10 << 20) + "\n")  # 20 MB of short fields: ten million of them
        f.write("0.01,0,0,9.8,0,0,0\n")
    spec = StreamSpec(id="imu", modality="imu", source=path, columns=tuple(zip(IMU_ROLES, cols)))
    src = ImuCsvSource(spec)
    tracemalloc.start()
    try:
        chunks = list(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(len(c) for c in chunks) == 2
    assert src.dropped == {"line_too_long": 1}
    assert peak < 8 << 20, f"reading used {peak / 2**20:.0f} MiB of Python memory"


def test_captions_over_the_text_limit_and_huge_jsonl_lines_are_dropped_and_counted(tmp_path):
    import json

    from sources.lines import MAX_LINE_CHARS
    from sources.session import StreamSpec
    from sources.text import MAX_TEXT_CHARS, TextJsonlSource

    path = tmp_path / "captions.jsonl"
    lines = [{"t": 0.0, "text": "a dog"}, {"t": 1.0, "text": "x" * (MAX_TEXT_CHARS + 1)},
             {"t": 2.0, "text": "y" * (10 << 20)}, {"t": 3.0, "text": "a cat"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = TextJsonlSource(StreamSpec(id="cap", modality="text", source=path))
    got = [u for c in src for u in c.data]
    assert got == ["a dog", "a cat"]
    assert src.dropped == {"text_too_long": 1, "line_too_long": 1}
    assert MAX_LINE_CHARS == 1 << 16
