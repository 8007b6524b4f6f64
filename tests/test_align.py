"""The aligner's watermark rule, driven with hand-made chunks and an injected clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.align import AlignConfig, Aligner, ModalitySpan
from sources.base import AUDIO_RATE, Chunk


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frames(t0: float, t1: float, fps: float, value_from_t: bool = True) -> Chunk:
    t = np.arange(t0, t1, 1.0 / fps)
    data = np.zeros((len(t), 4, 6, 3), dtype=np.uint8)
    if value_from_t:
        data[:] = (np.round(t * fps) % 256).astype(np.uint8)[:, None, None, None]
    return Chunk("cam", "vision", t, data)


def audio(t0: float, t1: float) -> Chunk:
    n = int(round((t1 - t0) * AUDIO_RATE))
    t = t0 + np.arange(n) / AUDIO_RATE
    return Chunk("mic", "audio", t, np.full(n, 0.5, dtype=np.float32))


def imu(t0: float, t1: float, hz: float = 200.0, stream: str = "imu") -> Chunk:
    t = np.arange(t0, t1, 1.0 / hz)
    return Chunk(stream, "imu", t, np.ones((len(t), 6), dtype=np.float32))


def released(windows):
    return [w.index for w in windows]


def test_windows_wait_for_every_stream_then_release_in_order():
    al = Aligner("s", {"cam": "vision", "mic": "audio"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    assert al.push(frames(0, 3, 10)) == []  # audio has said nothing yet
    out = al.push(audio(0, 2.5))
    assert released(out) == [0, 1]  # audio passed 2.0 but not 3.0
    out = al.push(audio(2.5, 3.2))
    assert released(out) == []  # vision watermark is 2.9 < 3.0
    out = al.push(frames(3, 4, 10))
    assert released(out) == [2]



def test_release_stream_sends_each_streams_part_as_soon_as_that_stream_has_passed():
    """The default: audio does not wait for a depth frame's tolerance (or a slower stream); a
    window counts as released once every stream's part is, and each stream's parts go in order."""
    al = Aligner("s", {"cam": "vision", "mic": "audio", "d": "depth"}, AlignConfig(hop=1.0, origin=0.0))
    out = al.push(frames(0, 3, 10))  # vision passed 2.9: its parts of windows 0 and 1
    assert [(w.index, [it.stream for it in w.items]) for w in out] == [(0, ["cam"]), (1, ["cam"])]
    assert al.windows_released == 0
    out = al.push(audio(0, 2.5))
    assert [(w.index, [it.stream for it in w.items]) for w in out] == [(0, ["mic"]), (1, ["mic"])]
    depth = Chunk("d", "depth", np.array([0.95, 1.55]), np.ones((2, 2, 2), np.float32))
    out = al.push(depth)  # passed 1.55 >= 1.0 + 0.5 (tolerance): window 0's frame, not yet window 1's
    assert [(w.index, [it.stream for it in w.items], w.missing) for w in out] == [(0, ["d"], [])]
    assert al.windows_released == 1 and al.next_window == 1
    # an ended stream has passed everything, and gives its part of every window known to exist:
    # the latest sample (the camera's 2.9) reaches window 2
    out = al.end_stream("mic")
    assert [(w.index, [it.stream for it in w.items]) for w in out] == [(2, ["mic"])]
    out = al.push(Chunk("d", "depth", np.array([2.6]), np.ones((1, 2, 2), np.float32)))
    assert [(w.index, [it.stream for it in w.items]) for w in out] == [(1, ["d"])]
    assert [it.t_end for it in out[0].items] == [1.55]
    assert al.windows_released == 2
    assert [(w.index, [it.stream for it in w.items]) for w in al.end_stream("cam")] == [(2, ["cam"])]
    out = al.end_stream("d")  # last sample 2.9: K = ceil(2.9) = 3 windows
    assert [(w.index, [it.stream for it in w.items], w.missing) for w in out] == [(2, ["d"], [])]
    assert al.done and al.windows_released == 3 and not al.missing


@pytest.mark.parametrize("seed", range(20))
def test_release_stream_and_window_cut_the_same_items(seed):
    """Random timelines: merged by index, the parts are exactly the whole windows."""
    rng = np.random.default_rng(seed)
    streams = {"cam": "vision", "mic": "audio", "i": "imu", "d": "depth", "tx": "text"}
    chunks = []
    for sid, m in streams.items():
        rate = {"vision": 10, "audio": 400, "imu": 50, "depth": 5, "text": 0.7}[m]
        t = np.sort(rng.uniform(0, 12, size=int(12 * rate)))
        cuts = np.sort(rng.choice(np.arange(1, len(t)), size=min(5, len(t) - 1), replace=False)) if len(t) > 1 else []
        for part in np.split(t, cuts):
            shape = {"vision": (4, 4, 3), "audio": (), "imu": (6,), "depth": (2, 2)}.get(m)
            data = [f"w{x:.2f}" for x in part] if m == "text" else np.full((len(part), *shape), 0.5, np.float32)
            if m == "vision":
                data = np.zeros((len(part), 4, 4, 3), np.uint8)
            chunks.append(Chunk(sid, m, part, data))
    order = rng.permutation(len(chunks))
    results = {}
    for release in ("stream", "window"):
        al = Aligner("s", streams, AlignConfig(hop=0.5, release=release), clock=lambda: 0.0)
        got = []
        # each stream's chunks in their own order, streams interleaved at random
        queues = {sid: [c for c in chunks if c.stream == sid] for sid in streams}
        for i in order:
            got += al.push(queues[chunks[i].stream].pop(0))
        for sid in streams:
            got += al.end_stream(sid)
        assert al.done
        merged = {}
        for w in got:
            m = merged.setdefault(w.index, ({}, set()))
            for it in w.items:
                assert it.stream not in m[0]
                m[0][it.stream] = it
            m[1].update(w.missing)
        if release == "stream":  # each stream's parts in index order, each once
            for sid in streams:
                idx = [w.index for w in got for it in w.items if it.stream == sid]
                assert idx == sorted(set(idx))
        results[release] = (merged, al.windows_released, dict(al.missing), dict(al.dropped))
    (ms, ns, miss_s, drop_s), (mw, nw, miss_w, drop_w) = results["stream"], results["window"]
    assert ns == nw == len(mw) and sorted(ms) == sorted(mw) and miss_s == miss_w and drop_s == drop_w
    for k in mw:
        assert ms[k][1] == mw[k][1]
        assert sorted(ms[k][0]) == sorted(mw[k][0])
        for sid, a in ms[k][0].items():
            b = mw[k][0][sid]
            assert (a.t_start, a.t_end) == (b.t_start, b.t_end)
            np.testing.assert_array_equal(np.asarray(a.payload), np.asarray(b.payload))

def test_a_chunk_that_promises_its_end_releases_the_window_without_waiting_for_the_next():
    al = Aligner("s", {"cam": "vision", "mic": "audio"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    al.push(audio(0, 2.0))  # audio passed 1.99994 only: window 1 (end 2.0) waits
    a = audio(2.0, 3.0)
    assert released(al.push(frames(0, 2, 10))) == [0]
    c = frames(2, 3, 10)
    c.passed = 3.0  # the source read the frame at 3.0 already
    a.passed = 3.0
    assert released(al.push(c)) == []
    assert released(al.push(a)) == [1, 2]  # window 2 (end 3.0) too, one chunk earlier than before
    # a promise is not a sample: the session still ends at its last real timestamp
    out = al.end_stream("cam") + al.end_stream("mic")
    assert released(out) == [] and al.windows_released == 3


def test_vision_takes_first_and_last_frame_of_its_two_second_span():
    al = Aligner("s", {"cam": "vision"}, AlignConfig(hop=1.0, origin=0.0))
    out = al.push(frames(0, 5, 10))
    w3 = out[3]  # ends at 4.0, span [2.0, 4.0)
    item = w3.items[0]
    assert item.payload.shape == (2, 4, 6, 3)
    assert item.t_start == pytest.approx(2.0) and item.t_end == pytest.approx(3.9)
    assert item.payload[0, 0, 0, 0] == 20 and item.payload[1, 0, 0, 0] == 39


def test_audio_window_is_exactly_two_seconds_and_zero_filled_before_the_stream_starts():
    al = Aligner("s", {"mic": "audio"}, AlignConfig(hop=1.0, origin=0.0))
    out = al.push(audio(0.0, 3.0))
    first = out[0].items[0]  # span [-1, 1): only [0, 1) has data
    assert first.payload.shape == (2 * AUDIO_RATE,)
    assert np.all(first.payload[:AUDIO_RATE] == 0) and np.all(first.payload[AUDIO_RATE:] == 0.5)
    full = out[1].items[0]
    assert np.all(full.payload == 0.5)


def test_out_of_order_samples_within_lateness_are_resorted():
    cfg = AlignConfig(hop=1.0, origin=0.0, allowed_lateness=0.5)
    al = Aligner("s", {"imu": "imu"}, cfg)
    al.push(imu(0.0, 1.0))
    al.push(imu(1.3, 1.6))
    al.push(imu(1.0, 1.3))  # 0.6 s behind the watermark is too late...
    assert al.dropped_by_reason().get("late", 0) > 0
    al2 = Aligner("s", {"imu": "imu"}, cfg)
    al2.push(imu(0.0, 1.0))
    al2.push(imu(1.2, 1.4))
    al2.push(imu(1.0, 1.2))  # ...0.4 s behind is re-sorted
    assert al2.dropped_by_reason() == {}
    out = al2.end_stream("imu")
    payload = out[-1].items[0].payload
    assert np.all(np.diff(payload[:, 0]) > 0)


def test_samples_for_already_released_windows_are_dropped_and_counted_as_late():
    al = Aligner("s", {"cam": "vision"}, AlignConfig(hop=1.0, origin=0.0, allowed_lateness=10.0))
    al.push(frames(0, 20, 10))
    al.push(frames(30, 31, 10))  # releases up to window 19 (ends 20 s <= 30.9 - 10)
    out = al.push(frames(0, 1, 10))  # span of window 20 starts at 19 s: these are useless now
    assert out == []
    assert al.dropped[("cam", "late")] == 10


def test_duplicate_and_non_finite_timestamps_are_counted_by_reason():
    al = Aligner("s", {"imu": "imu"}, AlignConfig(hop=1.0, origin=0.0))
    al.push(imu(0.0, 0.5))
    t = np.array([0.5, 0.5, np.nan, np.inf, 0.6])
    al.push(Chunk("imu", "imu", t, np.ones((5, 6), np.float32)))
    assert al.dropped_by_reason() == {"duplicate": 1, "bad_timestamp": 2}


def test_missing_modality_is_released_without_it_and_named():
    al = Aligner("s", {"cam": "vision", "imu": "imu"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    al.push(frames(0, 4, 10))
    al.push(imu(0.0, 1.0))
    al.push(imu(3.5, 4.0))  # nothing between 1 and 3.5 s... but the 5 s span still reaches back
    al.end_stream("cam")
    out = al.end_stream("imu")
    # IMU spans are 5 s: every window sees some IMU, so nothing is missing for it.
    assert all("imu" not in w.missing for w in out)
    al2 = Aligner("s", {"cam": "vision", "d": "depth"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    out = al2.push(frames(0, 4, 10))
    out += al2.push(Chunk("d", "depth", np.array([0.9, 3.1]), np.ones((2, 3, 3), np.float32)))
    out += al2.end_stream("d")
    out += al2.end_stream("cam")
    # windows end at 1, 2, 3, 4 s; depth frames at 0.9 and 3.1 are within 0.5 s of 1 and 3 only
    assert [w.missing for w in out] == [[], ["d"], [], ["d"]]
    assert al2.missing["d"] == 2


def test_an_ended_stream_stops_holding_windows_back():
    al = Aligner("s", {"cam": "vision", "mic": "audio"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    al.push(frames(0, 10, 10))
    assert al.push(audio(0, 1.5)) != []
    assert al.next_window == 1
    out = al.end_stream("mic", error="decode failed")
    assert released(out) == list(range(1, 9))  # vision alone drives the rest (up to 9.9 s)
    assert [w.missing for w in out[2:]] == [["mic"]] * 6  # audio ended at 1.5 s
    assert released(al.end_stream("cam")) == [9]
    assert al.stream_errors() == {"mic": "decode failed"}


def test_gap_in_a_stream_gives_windows_without_it_then_it_comes_back():
    al = Aligner("s", {"cam": "vision"}, AlignConfig(hop=1.0, origin=0.0))
    out = al.push(frames(0, 2, 10))
    out += al.push(frames(6, 8, 10))
    out += al.end_stream("cam")
    assert [bool(w.items) for w in out] == [True, True, True, False, False, False, True, True]


def test_different_rates_and_origin_auto():
    al = Aligner("s", {"cam": "vision", "imu": "imu", "mic": "audio"}, AlignConfig(hop=0.5))
    al.push(frames(100.25, 103, 7))
    al.push(imu(100.0, 103, hz=50))
    assert al.origin is None  # audio has not started yet
    al.push(audio(100.1, 103))
    assert al.origin == pytest.approx(100.0)
    for s in ("cam", "imu", "mic"):
        al.end_stream(s)
    assert al.done
    assert al.windows_released == 6


def test_nearest_frame_needs_the_watermark_past_the_tolerance():
    al = Aligner("s", {"d": "depth"}, AlignConfig(hop=1.0, origin=0.0))
    assert al.push(Chunk("d", "depth", np.array([0.0, 1.2]), np.ones((2, 2, 2), np.float32))) == []
    out = al.push(Chunk("d", "depth", np.array([1.6]), np.full((1, 2, 2), 7, np.float32)))
    assert released(out) == [0]
    assert out[0].items[0].t_start == pytest.approx(1.2)


def test_a_watermark_only_chunk_lets_windows_go_before_a_sparse_stream_s_next_sample():
    al = Aligner("s", {"cam": "vision", "tx": "text"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    al.push(Chunk("tx", "text", np.array([0.5]), ["hello"]))
    assert released(al.push(frames(0, 3.5, 10))) == []  # text has said nothing past 0.5
    beat = Chunk("tx", "text", np.empty(0), [], passed=2.0)  # no caption before 2.0
    assert released(al.push(beat)) == [0, 1]
    assert released(al.push(Chunk("tx", "text", np.empty(0), []))) == []  # no promise: nothing changes
    out = al.push(Chunk("tx", "text", np.array([3.2]), ["bye"]))
    assert released(out) == [2]
    assert [it.payload for w in out for it in w.items if it.modality == "text"] == []  # [2, 3) holds no caption
    assert al.dropped_by_reason() == {}


def test_text_in_the_hop_is_joined():
    al = Aligner("s", {"tx": "text"}, AlignConfig(hop=1.0, origin=0.0))
    out = al.push(Chunk("tx", "text", np.array([0.2, 0.7, 1.5]), ["a dog", "barks", "a car"]))
    out += al.end_stream("tx")
    assert [w.items[0].payload for w in out] == ["a dog barks", "a car"]


def test_ingest_times_of_the_newest_and_oldest_samples_used_are_carried():
    clock = FakeClock()
    al = Aligner("s", {"imu": "imu"}, AlignConfig(hop=1.0, origin=0.0), clock=clock)
    al.push(imu(0.0, 0.5))
    clock.now = 1005.0
    out = al.push(imu(0.5, 1.5))
    assert out[0].items[0].t_ingest == 1005.0
    # the oldest sample used came with the first chunk: the window took 5 s to fill
    assert out[0].items[0].t_ingest - out[0].items[0].t_first_ingest == 5.0


def test_memory_is_bounded_by_the_spans_not_the_session_length():
    al = Aligner("s", {"imu": "imu", "mic": "audio"}, AlignConfig(hop=1.0, origin=0.0))
    peak = 0
    for s in range(120):
        al.push(imu(s, s + 1))
        al.push(audio(s, s + 1))
        peak = max(peak, al.buffered_samples())
    # 5 s of IMU at 200 Hz and 2 s of audio at 16 kHz, plus one chunk of slack each
    assert peak <= 6 * 200 + 3 * AUDIO_RATE


@pytest.mark.parametrize("release", ["stream", "window"])
@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.lists(
                st.one_of(st.floats(min_value=-5, max_value=30), st.just(float("nan")), st.just(float("inf"))),
                max_size=20,
            ),
        ),
        max_size=25,
    ),
    hop=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    lateness=st.sampled_from([0.0, 0.5, 3.0]),
)
def test_property_every_window_released_once_in_order_and_counts_balance(release, chunks, hop, lateness):
    al = Aligner("s", {"a": "imu", "b": "depth"}, AlignConfig(hop=hop, allowed_lateness=lateness, release=release))
    got = []
    pushed = {"a": 0, "b": 0}
    for stream, ts in chunks:
        t = np.array(ts, dtype=np.float64)
        data = np.zeros((len(t), 6) if stream == "a" else (len(t), 2, 2), np.float32)
        pushed[stream] += len(t)
        got += al.push(Chunk(stream, "imu" if stream == "a" else "depth", t, data))
    got += al.end_stream("a")
    got += al.end_stream("b")
    assert al.done
    if release == "window":
        assert [w.index for w in got] == list(range(len(got)))
    else:  # each stream's part of every window, once, in order; indices ascending per call
        for stream in ("a", "b"):
            parts = [w.index for w in got for x in [*w.items, *w.missing] if getattr(x, "stream", x) == stream]
            assert parts == list(range(al.windows_released))
    for stream in ("a", "b"):
        dropped = sum(n for (s, _), n in al.dropped.items() if s == stream)
        assert al._buffers[stream].samples_in + dropped == pushed[stream]
    for w in got:
        for item in w.items:
            assert np.all(np.isfinite(np.asarray(item.payload, dtype=np.float64)))
            # (1e-9: |t - e| <= tolerance is decided in float, e.g. |1e-115 - (-0.5)| == 0.5)
            assert item.t_start <= item.t_end <= w.t_end + al.config.spans[item.modality].lookahead() + 1e-9


@settings(max_examples=100, deadline=None)
@given(steps=st.sets(st.integers(0, 80), min_size=1, max_size=30), hop=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
def test_property_every_caption_is_in_exactly_one_window_even_on_a_window_end(steps, hop):
    """With a text span of one hop, windows ``[e_k - hop, e_k)`` tile the session: each caption
    is in one window, the last one too when it lies exactly on a window end (a 0.25 s grid)."""
    times = sorted(0.25 * k for k in steps)
    al = Aligner("s", {"cap": "text"}, AlignConfig(hop=hop, spans={"text": ModalitySpan(span=hop)}))
    out = al.push(Chunk("cap", "text", np.array(times), [f"w{i}" for i in range(len(times))]))
    out += al.end_stream("cap")
    words = [w for win in out for item in win.items for w in item.payload.split()]
    assert sorted(words) == sorted(f"w{i}" for i in range(len(times))), (times, hop)
    assert not al.dropped


def test_list_source_drives_the_aligner_like_a_real_source():
    from sources.memory import ListSource

    src = ListSource([imu(0.0, 1.0), imu(1.0, 2.5)], error=RuntimeError("tail corrupt"))
    al = Aligner("s", {"imu": "imu"}, AlignConfig(hop=1.0, origin=0.0))
    out = []
    with pytest.raises(RuntimeError, match="tail corrupt"):
        for chunk in src:
            out += al.push(chunk)
    out += al.end_stream("imu", error="tail corrupt")
    assert released(out) == [0, 1, 2]


def test_live_idle_stream_holds_the_others_back_at_most_idle_after_seconds():
    cfg = AlignConfig(hop=1.0, origin=0.0, idle_after=2.0, release="window")
    al = Aligner("s", {"cam": "vision", "d": "depth"}, cfg)
    out = al.push(Chunk("d", "depth", np.array([0.9]), np.ones((1, 2, 2), np.float32)))
    out += al.push(frames(0, 6, 10))  # depth goes silent; vision reaches 5.9 s
    # depth counts as passed up to 5.9 - 2 = 3.9 s: windows needing up to end + 0.5 <= 3.9 go out
    assert released(out) == [0, 1, 2]
    assert [w.missing for w in out] == [[], ["d"], ["d"]]
    late = al.push(Chunk("d", "depth", np.array([1.9]), np.ones((1, 2, 2), np.float32)))
    assert late == [] and al.dropped[("d", "late")] == 1  # its window is gone: counted, not lost silently
    # replay (idle_after unset) waits for every stream instead: nothing is lost
    al2 = Aligner("s", {"cam": "vision", "d": "depth"}, AlignConfig(hop=1.0, origin=0.0, release="window"))
    al2.push(Chunk("d", "depth", np.array([0.9]), np.ones((1, 2, 2), np.float32)))
    assert released(al2.push(frames(0, 6, 10))) == []


def test_live_silent_stream_does_not_hold_back_the_origin():
    al = Aligner("s", {"cam": "vision", "mic": "audio"}, AlignConfig(hop=1.0, idle_after=1.5, release="window"))
    out = al.push(frames(10.0, 13.0, 10))  # the microphone never says anything
    assert al.origin == pytest.approx(10.0)
    assert released(out) == [0] and out[0].missing == ["mic"]


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6), data=st.data())
def test_buffered_rows_match_one_array(sizes, data):
    """The aligner keeps a stream's rows as the chunks they came in (no copy per chunk); every
    way a window reads them (rows, spans, eviction) gives what one concatenated array gives."""
    from pipeline.align import _Rows

    rows, ref, nxt = _Rows(), np.empty((0, 2)), 0
    for n in sizes:
        block = np.arange(nxt, nxt + n, dtype=np.float64)[:, None].repeat(2, axis=1)
        nxt += n
        rows.append(block)
        ref = np.concatenate([ref, block])
        if data.draw(st.booleans()):
            drop = data.draw(st.integers(0, len(ref)))
            rows.drop_front(drop)
            ref = ref[drop:]
        assert len(rows) == len(ref)
        if len(ref):
            lo = data.draw(st.integers(0, len(ref) - 1))
            hi = data.draw(st.integers(lo + 1, len(ref)))
            np.testing.assert_array_equal(rows.slice(lo, hi), ref[lo:hi])
            idx = np.sort(np.array(data.draw(st.lists(st.integers(0, len(ref) - 1), min_size=1, max_size=4))))
            np.testing.assert_array_equal(rows.take(idx), ref[idx])
            np.testing.assert_array_equal(rows.all(), ref)


def test_a_sample_before_the_first_windows_reach_is_not_late():
    """Paced replay sends a stream's first sample alone; the rest of its first chunk can arrive
    once the grid is fixed. Depth frames before e_0 - tolerance were never usable by a window:
    not counted as late. The same frames after window 0 went out are late, and counted."""
    cfg = AlignConfig(hop=1.0, spans={"imu": ModalitySpan(span=1.0), "depth": ModalitySpan(tolerance=0.5)})
    al = Aligner("s", {"i": "imu", "d": "depth"}, cfg)
    frame = np.ones((1, 2, 2), np.float32)
    al.push(Chunk("i", "imu", np.array([0.0]), np.zeros((1, 6), np.float32)))
    al.push(Chunk("d", "depth", np.array([0.0]), frame))
    assert al.origin == 0.0
    al.push(Chunk("d", "depth", np.array([0.1, 0.2]), np.ones((2, 2, 2), np.float32)))  # before 1.0 - 0.5
    assert al.dropped_by_reason() == {}
    al.push(Chunk("d", "depth", np.array([1.0, 1.6]), np.ones((2, 2, 2), np.float32)))
    out = al.push(Chunk("i", "imu", np.arange(0.01, 1.2, 0.01), np.zeros((119, 6), np.float32)))
    assert [w.index for w in out] == [0] and out[0].missing == []
    al.push(Chunk("d", "depth", np.array([1.3]), frame))  # within window 1's reach, but too late
    assert al.dropped_by_reason() == {"late": 1}
