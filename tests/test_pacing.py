"""Paced replay (sources.replay.ReplayPacer): when each chunk of a stream goes out at rate > 0,
and the watermark-only chunks in between, on a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from sources.base import Chunk
from sources.replay import ReplayPacer


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s


def _replay(chunks: list[Chunk], rate: float = 1.0, every: float = 0.5, stop_waiting=None):
    """[(wall seconds since the first chunk was waited for, 'chunk' | 'beat', passed or newest)] as a stream reader sends."""
    ft = FakeTime()
    pacer = ReplayPacer(rate, every, clock=ft.clock, sleep=ft.sleep, stop_waiting=stop_waiting)
    sent_upto = -np.inf
    out = []
    for c in chunks:
        for x in pacer.wait(c, lambda: sent_upto):  # noqa: B023 (reads the loop's current value on purpose)
            assert x > sent_upto
            out.append((round(ft.now - 100.0, 6), "beat", x))
            sent_upto = x
        out.append((round(ft.now - 100.0, 6), "chunk", c.passed))
        sent_upto = max(sent_upto, float(c.t.max()), c.passed if c.passed is not None else -np.inf)
    return out


def _caption(t: float, nxt: float | None) -> Chunk:
    return Chunk("tx", "text", np.array([t]), ["x"], passed=nxt)


def test_sparse_captions_go_out_a_chunk_after_them_with_watermarks_in_between():
    got = _replay([_caption(0.5, 3.0), _caption(3.0, 5.5), _caption(5.5, None)])
    assert got == [
        (0.5, "chunk", 1.0),  # sent 0.5 s after its sample (not at 3.0, when the next is read); passed cut to 1.0
        (1.0, "beat", 1.5), (1.5, "beat", 2.0), (2.0, "beat", 2.5),  # never at or past the unsent 3.0
        (3.0, "chunk", 3.5),
        (3.5, "beat", 4.0), (4.0, "beat", 4.5), (4.5, "beat", 5.0),
        (5.0, "chunk", None),  # the last: at its own time (5.5 s of stream time is 5.0 s after the first)
    ]


def test_dense_chunks_go_out_when_the_next_sample_exists_without_watermarks():
    t = np.arange(0, 3, 0.1)
    chunks = [Chunk("imu", "imu", t[i:i + 5], np.zeros((5, 6)), passed=float(t[i + 5]) if i + 5 < len(t) else None)
              for i in range(0, len(t), 5)]
    got = _replay(chunks)
    assert [k for _, k, _ in got] == ["chunk"] * 6
    assert [w for w, _, _ in got] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 2.9])  # relative to the first sample
    assert [p for _, _, p in got][:-1] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])


def test_twice_as_fast_halves_every_wall_time():
    slow = _replay([_caption(0.5, 3.0), _caption(3.0, None)])
    fast = _replay([_caption(0.5, 3.0), _caption(3.0, None)], rate=2.0)
    assert [(w / 2, k, p) for w, k, p in slow] == fast


def test_a_first_sample_sent_before_the_clock_starts_anchors_the_stream_clock():
    """Paced replay sends a stream's first sample before the run's start (``anchor``, no wait);
    the stream's later samples keep the times they have relative to it, from ``wall0``."""
    ft = FakeTime()
    pacer = ReplayPacer(1.0, 0.5, clock=ft.clock, sleep=ft.sleep, wall0=102.0)  # the clock starts in 2 s
    head = Chunk("imu", "imu", np.array([10.0]), np.zeros((1, 6)))
    assert pacer.anchor(head) == 102.0  # counts as entering when the clock reaches it
    assert ft.now == 100.0  # not waited for
    rest = Chunk("imu", "imu", np.array([10.1, 10.2, 10.3]), np.zeros((3, 6)), passed=10.4)
    assert list(pacer.wait(rest, lambda: 10.0)) == []
    assert ft.now == pytest.approx(102.4)  # 0.4 s of stream time after the head, from the start
    assert pacer.anchor(rest) == pytest.approx(102.3)  # a stream is anchored once
    assert pacer.t_first == 10.0


def test_rate_and_every_must_be_positive():
    with pytest.raises(ValueError):
        ReplayPacer(0.0, 0.5)
    with pytest.raises(ValueError):
        ReplayPacer(1.0, 0.0)


def test_watermarks_are_aimed_at_the_times_windows_wait_for():
    """Depth with a 0.1 s tolerance: a window ending at e waits for the stream to pass e + 0.1,
    so a sparse stream's watermarks go out exactly then (and every ``every`` at the latest)."""
    from pipeline.align import AlignConfig, ModalitySpan
    from pipeline.selection import next_need

    cfg = AlignConfig(hop=1.0, spans={"depth": ModalitySpan(tolerance=0.1)})
    need = lambda x: next_need(cfg, "depth", 0.0, x)  # noqa: E731
    assert [need(x) for x in (0.0, 1.05, 1.1, 1.2, 7.0)] == pytest.approx([1.1, 1.1, 2.1, 2.1, 7.1])
    ft = FakeTime()
    pacer = ReplayPacer(1.0, 5.0, clock=ft.clock, sleep=ft.sleep, next_need=need)
    first = Chunk("d", "depth", np.array([0.0]), np.zeros((1, 2, 2)), passed=0.1)
    list(pacer.wait(first, lambda: -np.inf))
    sent = 0.1
    beats = []
    for x in pacer.wait(Chunk("d", "depth", np.array([4.0]), np.zeros((1, 2, 2))), lambda: sent):  # noqa: B023 (reads the current value on purpose)
        beats.append((round(ft.now - 100.0, 6), round(x, 6)))
        sent = x
    assert beats == [(1.1, 1.1), (2.1, 2.1), (3.1, 3.1)]  # then the chunk itself, at 4.0


def test_chunks_are_cut_where_windows_wait_so_a_long_chunk_holds_no_window_back():
    """A 1 s IMU chunk spanning the end of window 0 (e_0 = 1.0): the samples before 1.0 go out
    when the replay clock reaches 1.0, bounded by the next sample, not at the chunk's end."""
    from pipeline.align import AlignConfig
    from pipeline.selection import next_need

    cfg = AlignConfig(hop=1.0)
    ft = FakeTime()
    pacer = ReplayPacer(1.0, 1.0, clock=ft.clock, sleep=ft.sleep, next_need=lambda x: next_need(cfg, "imu", 0.0, x))
    t = np.round(np.arange(0.5, 1.5, 0.1), 6)
    chunk = Chunk("imu", "imu", t, np.arange(len(t) * 6, dtype=np.float32).reshape(-1, 6), passed=1.5, meta={"s": 1})
    pieces = pacer.split(chunk)
    assert [p.t.tolist() for p in pieces] == [[0.5, 0.6, 0.7, 0.8, 0.9], [1.0, 1.1, 1.2, 1.3, 1.4]]
    assert [p.passed for p in pieces] == [1.0, 1.5]
    np.testing.assert_array_equal(np.concatenate([p.data for p in pieces]), chunk.data)
    sent = []
    for p in pieces:
        list(pacer.wait(p, lambda: -np.inf))
        sent.append(round(ft.now - 100.0, 6))
    assert sent == [0.5, 1.0]  # relative to the first sample: at stream times 1.0 and 1.5
    # Unknown grid (no next_need), or times that go back: the chunk stays whole.
    assert ReplayPacer(1.0, 1.0).split(chunk) == [chunk]
    assert pacer.split(Chunk("imu", "imu", t[::-1].copy(), chunk.data))[0].t.tolist() == t[::-1].tolist()


def test_a_frame_goes_out_when_its_window_waits_not_when_the_next_frame_exists():
    """Depth at 10 Hz, tolerance 0.05: the frame at e_0 = 1.0 is bounded by the next at 1.1, but
    the window waits only until 1.05, when a live sensor's silence since 1.0 is known."""
    from pipeline.align import AlignConfig, ModalitySpan
    from pipeline.selection import next_need

    cfg = AlignConfig(hop=1.0, spans={"depth": ModalitySpan(tolerance=0.05)})
    ft = FakeTime()
    pacer = ReplayPacer(1.0, 0.5, clock=ft.clock, sleep=ft.sleep, next_need=lambda x: next_need(cfg, "depth", 0.0, x))
    sent = []
    for t, nxt in ((0.0, 0.5), (1.0, 1.1)):
        c = Chunk("d", "depth", np.array([t]), np.zeros((1, 2, 2)), passed=nxt)
        list(pacer.wait(c, lambda: -np.inf))
        sent.append((round(ft.now - 100.0, 6), c.passed))
    assert sent == [(0.5, 0.5), (1.05, 1.05)]



def test_a_far_caption_is_not_waited_for_once_stop_waiting_says_so_and_neither_is_the_rest():
    """A caption at 100000 s after one at 0.5 s: while ``stop_waiting`` says no (the session's
    other streams still run) the pacer sends watermarks and waits; from the moment it says yes
    (at 3 s of wall time here) that chunk goes out at once, and so do the later ones, whole."""
    ft = FakeTime()
    asked: list[float] = []

    def others_ended(x: float) -> bool:
        asked.append(x)
        return ft.now >= 103.0

    pacer = ReplayPacer(1.0, 0.5, clock=ft.clock, sleep=ft.sleep, stop_waiting=others_ended)
    pacer.anchor(_caption(0.5, None))  # the stream's first caption, sent at once; its clock starts at 100
    sent = 0.5
    beats = []
    for x in pacer.wait(_caption(100000.0, None), lambda: sent):  # noqa: B023 (reads the current value on purpose)
        beats.append(x)
        sent = x
    assert ft.now == pytest.approx(103.0)  # not 99999.5 s after the start
    assert beats == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.5])  # the watermarks until then
    assert pacer.unpaced_from == 100000.0
    n_asked = len(asked)
    later = Chunk("tx", "text", np.array([100001.0, 100001.2]), ["y", "z"], passed=None)
    assert pacer.split(later) == [later]
    assert list(pacer.wait(later, lambda: 100000.0)) == []
    assert ft.now == pytest.approx(103.0) and len(asked) == n_asked  # no wait, nothing more to ask


def test_a_caption_is_waited_for_while_stop_waiting_says_no():
    """The same pacer whose ``stop_waiting`` says no sends a near caption at its time, as without
    one, and keeps waiting for a far one; with no watermark to send (a stream whose first chunk
    was paced: nothing sent yet) it still asks again every ``every`` of stream time."""
    near = [_caption(0.5, 3.0), _caption(3.0, 5.5), _caption(5.5, None)]
    assert _replay(near, stop_waiting=lambda x: False) == _replay(near)
    ft = FakeTime()
    pacer = ReplayPacer(1.0, 0.5, clock=ft.clock, sleep=ft.sleep, stop_waiting=lambda x: False)
    pacer.anchor(_caption(0.5, None))
    sent = [0.5]
    waiting = pacer.wait(_caption(100000.0, None), lambda: sent[-1])
    for _ in range(200):
        sent.append(next(waiting))
    assert ft.now == pytest.approx(200.0) and pacer.unpaced_from is None  # still waiting after 100 s

    ft = FakeTime()
    pacer = ReplayPacer(1.0, 0.5, clock=ft.clock, sleep=ft.sleep, stop_waiting=lambda x: ft.now >= 102.0)
    pacer.anchor(_caption(0.5, None))
    assert list(pacer.wait(_caption(100000.0, None), lambda: -np.inf)) == []
    assert ft.now == pytest.approx(102.0) and pacer.unpaced_from == 100000.0


# -- reading ahead (sources._common.Prefetch), as paced replay sources do ---------------------


def test_prefetch_reads_ahead_in_order_at_lower_priority_and_ends_with_the_sources_error():
    import os
    import threading
    import time

    from sources._common import Prefetch

    seen = {}

    def source():
        seen["tid"] = threading.get_native_id()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, seen["tid"])
        for i in range(5):
            seen["read"] = i
            yield i
        raise ValueError("frame 5 is corrupt")

    base = os.getpriority(os.PRIO_PROCESS, 0)
    p = Prefetch(source(), depth=2, niceness=3)
    time.sleep(0.2)
    assert seen["read"] == 1  # two items read ahead, no more: bounded
    got = []
    with pytest.raises(ValueError, match="frame 5 is corrupt"):
        for x in p:
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert seen["tid"] != threading.get_native_id()  # decoded in the prefetch thread
    if p.niceness_applied:
        assert seen["nice"] == min(19, base + 3)
    p.close()


def test_prefetch_reads_at_normal_priority_when_the_thread_cannot_be_reniced(monkeypatch, caplog):
    import logging
    import os

    from sources._common import Prefetch

    def refuse(*args):  # as setpriority does where lowering a thread's priority is not permitted
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    caplog.set_level(logging.DEBUG, logger="sources")
    p = Prefetch(iter(range(5)), depth=2, niceness=3)
    assert list(p) == [0, 1, 2, 3, 4]
    assert not p.niceness_applied
    assert any("cannot renice" in r.getMessage() for r in caplog.records)
    p.close()


def test_prefetch_holds_off_after_a_take_unless_the_consumer_has_nothing_left():
    import time

    from sources._common import Prefetch

    read_at = {}

    def source():
        for i in range(6):
            read_at[i] = time.monotonic()
            yield i

    p = Prefetch(source(), depth=2, holdoff_s=0.5)
    time.sleep(0.1)
    assert sorted(read_at) == [0, 1]  # read ahead at once: nothing taken yet
    it = iter(p)
    assert next(it) == 0
    taken = time.monotonic()
    time.sleep(0.1)
    assert 2 not in read_at  # the consumer still holds item 1: reading waits
    time.sleep(0.8)
    assert 2 in read_at and read_at[2] - taken >= 0.49  # read once the hold-off passed
    assert next(it) == 1
    assert next(it) == 2  # nothing left after this take: the next read does not wait
    t = time.monotonic()
    assert next(it) == 3 and time.monotonic() - t < 0.3
    assert list(it) == [4, 5]
    p.close()


def test_prefetch_waits_for_the_grid_after_the_first_item_and_close_stops_it():
    import itertools
    import time

    from sources._common import Prefetch

    grid = {"known": False}
    read = []

    def source():
        for i in itertools.count():
            read.append(i)
            yield i

    p = Prefetch(source(), depth=4, after_first=lambda: grid["known"], after_first_s=5.0)
    time.sleep(0.2)
    assert read == [0]  # the rest waits until the grid is known (frames read before it are all kept)
    grid["known"] = True
    time.sleep(0.2)
    assert len(read) >= 4
    p.close()
    n = len(read)
    time.sleep(0.1)
    assert len(read) == n  # stopped
