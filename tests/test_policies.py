"""The aligner's policies on their own: no Ray, no event loop, a fake clock (plain floats).

Each rule here was reachable before only by killing a process or slowing a model; the Ray
graph's fault tests (test_faults.py, test_live_faults.py, test_record.py) check the wiring.
"""

from __future__ import annotations

import math

import pytest

from pipeline.admission import LiveAdmission
from pipeline.align import Window, WindowItem
from pipeline.dispatch import Attempt, EncoderDispatch, PublishLedger
from pipeline.metrics import RayMetrics
from pipeline.observe import NullObserver, StageObserver
from pipeline.ordering import ChunkSequencer, PublishOrder, ReadyInOrder, ReleaseCoalescer, StreamEnd
from pipeline.stats import SessionResult, SessionStats, merge_dropped


def _item(stream: str, modality: str, window: int, t_ingest: float) -> WindowItem:
    return WindowItem(session="s", stream=stream, modality=modality, window=window, t_start=0.0, t_end=1.0,
                      payload=None, t_ingest=t_ingest)


def _window(index: int, t_ingest: float, streams: dict[str, str] | None = None) -> Window:
    streams = streams or {"cam": "vision", "mic": "audio"}
    return Window("s", index, float(index + 1), [_item(s, m, index, t_ingest) for s, m in streams.items()], [])


# -- chunk order and stream ends ------------------------------------------------------------------
def test_chunks_are_applied_in_seq_order_whatever_order_they_arrive_in():
    seq: ChunkSequencer[list] = ChunkSequencer()
    c0, c1, c2 = [1], [2, 3], [4]
    assert seq.push("imu", 2, c2) == [] and seq.push("imu", 1, c1) == []
    assert seq.push("imu", 0, c0) == [c0, c1, c2]
    assert seq.push("cam", 0, [9]) == [[9]]  # streams are independent
    assert seq.next_seq("imu") == 3


def test_a_stream_ends_once_its_announced_chunks_arrived():
    seq: ChunkSequencer[list] = ChunkSequencer()
    seq.push("imu", 0, [1])
    assert seq.end("imu", 3, None) == []  # chunk 1 and 2 still on their way
    assert seq.push("imu", 2, [3]) == []
    assert seq.push("imu", 1, [2]) == [[2], [3], StreamEnd("imu", None)]
    assert seq.ended("imu")
    assert seq.end("imu", 3, "again") == []  # a second end changes nothing


def test_a_stream_that_failed_ends_with_its_error_after_the_chunks_it_sent():
    seq: ChunkSequencer[list] = ChunkSequencer()
    assert seq.end("cam", 1, "cam.mp4 is truncated") == []
    assert seq.push("cam", 0, [1, 1]) == [[1, 1], StreamEnd("cam", "cam.mp4 is truncated")]


def test_a_chunk_after_the_announced_end_is_a_bug_not_a_silent_drop():
    seq: ChunkSequencer[list] = ChunkSequencer()
    seq.end("mic", 1, None)
    with pytest.raises(ValueError, match="chunk 1 after its announced end"):
        seq.push("mic", 1, [1])
    seq.push("mic", 0, [1])
    with pytest.raises(ValueError, match="chunk 2 after its announced end"):
        seq.push("mic", 2, [1])


# -- release coalescing ---------------------------------------------------------------------------
def test_releases_within_the_coalescing_window_share_one_send():
    co = ReleaseCoalescer(0.005)
    w1, w2, w3 = _window(0, 0.0), _window(1, 0.0), _window(2, 0.0)
    assert co.add([w1], now=10.0) == [] and co.deadline == pytest.approx(10.005)
    assert co.add([w2], now=10.003) == [] and co.deadline == pytest.approx(10.005)  # the first sets it
    assert co.due(10.004) == []
    assert co.due(10.005) == [w1, w2] and co.deadline is None and co.held == 0
    assert co.add([w3], now=11.0) == [] and co.deadline == pytest.approx(11.005)  # a new group


def test_coalescing_off_sends_every_release_at_once():
    co = ReleaseCoalescer(0.0)
    w = _window(0, 0.0)
    assert co.add([w], now=0.0) == [w] and co.deadline is None and co.held == 0


# -- publish order ----------------------------------------------------------------------------------
def test_a_window_at_or_below_the_last_published_of_its_stream_is_a_counted_duplicate():
    order = PublishOrder()
    assert order.admit("cam", 0) and order.admit("cam", 2)
    assert not order.admit("cam", 2) and not order.admit("cam", 1)
    assert order.admit("cam2", 1)  # two streams of one modality are kept apart
    assert order.dropped == {"cam:duplicate_window": 2}


# -- publishing what is ready -----------------------------------------------------------------------
def _ready_queue(together: bool) -> tuple[ReadyInOrder, set]:
    """Entries are (topic, window) pairs; an entry is ready once it is in ``ready``."""
    ready: set = set()
    return ReadyInOrder(lambda e: e[0], lambda e: e in ready, together=together), ready


def test_a_topic_whose_tower_answered_goes_out_without_waiting_for_slower_towers():
    q, ready = _ready_queue(together=False)
    q.add("w0", [("audio", 0), ("vision", 0)])
    q.add("w1", [("audio", 1), ("vision", 1)])
    ready |= {("audio", 0), ("audio", 1)}
    assert q.take() == ([("audio", 0), ("audio", 1)], [])  # vision still computing
    assert len(q) == 2 and q.take() == ([], [])  # nothing goes twice
    ready.add(("vision", 1))  # a later window of a topic never overtakes an earlier one
    assert q.take() == ([], [])
    ready.add(("vision", 0))
    assert q.take() == ([("vision", 0), ("vision", 1)], ["w0", "w1"])
    assert len(q) == 0


def test_whole_windows_go_out_together_and_in_order():
    q, ready = _ready_queue(together=True)
    q.add("w0", [("audio", 0), ("vision", 0)])
    q.add("w1", [("audio", 1), ("vision", 1)])
    q.add("w2", [])  # a window that holds nothing
    ready |= {("audio", 0), ("audio", 1), ("vision", 1)}
    assert q.take() == ([], [])  # w0's vision holds w0, and w0 holds w1
    ready.add(("vision", 0))
    assert q.take() == ([("audio", 0), ("vision", 0), ("audio", 1), ("vision", 1)], ["w0", "w1", "w2"])


def test_a_window_counts_until_its_last_entry_went_out_wherever_it_stands():
    q, ready = _ready_queue(together=False)
    q.add("w0", [("audio", 0), ("depth", 0)])
    q.add("w1", [("audio", 1)])
    q.add("w2", [])
    ready |= {("audio", 0), ("audio", 1)}
    assert q.take() == ([("audio", 0), ("audio", 1)], ["w1", "w2"])  # w0 still waits for depth
    assert len(q) == 1  # backpressure counts what is still held


# -- live admission ---------------------------------------------------------------------------------
def test_a_window_expected_past_the_bound_is_shed_and_counted_per_stream():
    adm = LiveAdmission(max_latency_s=1.0, inflight=4)
    adm.served_s = 0.4
    old, fresh = _window(0, t_ingest=99.3), _window(1, t_ingest=99.9)  # ages 0.7 and 0.1 at 100.0
    adm.offer([old, fresh])
    assert adm.admit(now=100.0) == [fresh]  # 0.7 + 0.4 > 1.0
    assert adm.dropped == {"cam:shed_latency": 1, "mic:shed_latency": 1}


def test_subsample_drops_the_configured_modalities_of_every_other_window_past_half_the_bound():
    adm = LiveAdmission(max_latency_s=1.0, inflight=8, shed="subsample", subsample=["vision"])
    ws = [_window(i, t_ingest=99.4) for i in range(4)]  # age 0.6: past half the bound
    early = _window(4, t_ingest=100.0)  # age 0: under half
    adm.offer(ws + [early])
    got = adm.admit(now=100.0)
    assert [w.index for w in got] == [0, 1, 2, 3, 4]
    assert [[it.modality for it in w.items] for w in got] == [
        ["vision", "audio"], ["audio"], ["vision", "audio"], ["audio"], ["vision", "audio"]]
    assert adm.dropped == {"cam:subsampled": 2}


def test_at_most_inflight_windows_are_dispatched_and_parts_of_one_window_count_once():
    adm = LiveAdmission(max_latency_s=0.0, inflight=2)
    a0 = _window(0, 0.0, {"cam": "vision"})
    a0b = _window(0, 0.0, {"mic": "audio"})  # release: stream gives window 0 in two parts
    a1, a2 = _window(1, 0.0), _window(2, 0.0)
    adm.offer([a0, a1, a0b, a2])
    assert adm.admit(now=1.0) == [a0, a1, a0b]  # the cap: two windows, window 0's parts both in
    adm.served(a0, now=1.5)
    assert adm.admit(now=1.5) == []  # window 0's other part is still in flight
    adm.served(a0b, now=1.5)
    assert adm.admit(now=1.5) == [a2] and adm.backlog == 0


def test_the_part_of_a_window_in_flight_is_admitted_past_the_cap():
    adm = LiveAdmission(max_latency_s=0.0, inflight=1)
    a0, a0b, a1 = _window(0, 0.0, {"cam": "vision"}), _window(0, 0.0, {"mic": "audio"}), _window(1, 0.0)
    adm.offer([a0, a0b, a1])
    assert adm.admit(now=0.0) == [a0, a0b]  # window 1 waits for window 0
    adm.served(a0, now=0.1)
    assert adm.admit(now=0.1) == []  # window 0's second part is still in flight
    adm.served(a0b, now=0.1)
    assert adm.admit(now=0.1) == [a1]


def test_the_served_estimate_decays_while_nothing_is_in_flight_so_a_stall_does_not_shed_forever():
    adm = LiveAdmission(max_latency_s=1.0, inflight=2)
    adm.served_s = 5.0  # taken during a publisher restart
    ws = [_window(i, t_ingest=100.0) for i in range(4)]
    adm.offer(ws)
    assert adm.admit(now=100.0) == [ws[3]]  # 5 -> 2.5 -> 1.25 -> 0.625: the fourth fits again
    assert adm.served_s == pytest.approx(0.625)
    assert adm.dropped == {"cam:shed_latency": 3, "mic:shed_latency": 3}


def test_no_decay_for_a_window_older_than_the_bound_or_while_windows_are_in_flight():
    adm = LiveAdmission(max_latency_s=1.0, inflight=4)
    adm.served_s = 0.5
    adm.offer([_window(0, t_ingest=98.0)])  # age 2 > bound: its own age sheds it
    assert adm.admit(now=100.0) == [] and adm.served_s == 0.5
    adm.offer([_window(1, t_ingest=100.0)])
    assert len(adm.admit(now=100.0)) == 1
    adm.served_s = 3.0
    adm.offer([_window(2, t_ingest=100.0)])
    assert adm.admit(now=100.0) == [] and adm.served_s == 3.0  # window 1 in flight will refresh it


def test_the_served_estimate_follows_dispatch_to_publish_time():
    adm = LiveAdmission(max_latency_s=10.0, inflight=2)
    w = _window(0, t_ingest=0.0)
    adm.offer([w])
    adm.admit(now=1.0)
    adm.served(w, now=2.0)
    assert adm.served_s == pytest.approx(0.3) and adm.in_flight == 0


def test_a_result_older_than_90_percent_of_the_bound_is_not_published():
    adm = LiveAdmission(max_latency_s=1.0)
    assert not adm.late(_item("cam", "vision", 0, t_ingest=0.0), now=0.9)
    assert adm.late(_item("cam", "vision", 1, t_ingest=0.0), now=0.91)
    assert adm.dropped == {"cam:late_publish": 1}
    assert not LiveAdmission(max_latency_s=0.0).late(_item("cam", "vision", 2, 0.0), now=1e9)  # bound off


# -- encoder dispatch and retries ----------------------------------------------------------------------
def test_the_least_loaded_live_replica_is_picked():
    d = EncoderDispatch(3)
    d.sent(0, 5)
    d.sent(1, 2)
    assert d.pick() == 2
    d.sent(2, 4)
    assert d.pick() == 1
    d.returned(0, 5)
    assert d.pick() == 0
    d.mark_dead(0)
    assert d.pick() == 1


def test_a_lost_batch_is_retried_on_another_replica_after_a_backoff():
    d = EncoderDispatch(2, retries=2)
    b = d.budget("vision", 4, now=0.0)
    assert b.next() == Attempt(0, 0.0)
    b.lost(0, now=1.0)
    assert b.next() == Attempt(1, pytest.approx(0.2))
    b.lost(1, now=2.0)
    assert b.next() == Attempt(0, pytest.approx(0.4)) and d.retries_done == 2


def test_a_dead_replica_with_no_other_drops_the_batch_as_encoder_error():
    d = EncoderDispatch(1, retries=2)
    b = d.budget("audio", 3, now=0.0)
    assert b.next() == Attempt(0, 0.0)
    d.mark_dead(0)  # restarts exhausted
    b.lost(0, now=0.5)
    assert b.next() is None and b.next() is None
    assert d.dropped() == {"audio:encoder_error": 3}  # counted once


def test_a_restarting_replica_is_waited_for_until_the_deadline():
    d = EncoderDispatch(1, retries=2, restart_timeout_s=120.0)
    b = d.budget("imu", 2, now=1000.0)
    for t in (1001.0, 1060.0, 1119.0):
        assert b.next() is not None
        b.lost(0, now=t)
    assert b.next().delay_s == pytest.approx(0.6)  # 0.2 s per try so far, up to 2 s
    b.lost(0, now=1120.5)  # past the deadline
    assert b.next() is None and d.dropped() == {"imu:encoder_error": 2}


def test_a_refused_batch_is_retried_retries_times_then_dropped():
    d = EncoderDispatch(2, retries=2)
    b = d.budget("depth", 1, now=0.0, refused_on=0)  # the call carrying every tower refused it
    assert b.next() == Attempt(1, 0.5) and d.retries_done == 1
    b.refused(1)
    assert b.next() == Attempt(0, 1.0) and d.retries_done == 2
    b.refused(0)
    assert b.next() is None and d.dropped() == {"depth:encoder_error": 1}


def test_no_retries_means_a_refused_batch_is_dropped_at_once():
    d = EncoderDispatch(1, retries=0)
    b = d.budget("text", 2, now=0.0, refused_on=0)
    assert b.next() is None and d.retries_done == 0 and d.dropped() == {"text:encoder_error": 2}


def test_with_every_replica_dead_nothing_is_tried():
    d = EncoderDispatch(2)
    d.mark_dead(0)
    d.mark_dead(1)
    assert d.pick() is None and d.budget("vision", 1, now=0.0).next() is None


# -- publish seq ledger ---------------------------------------------------------------------------------
def test_a_call_that_died_half_way_leaves_the_ledger_past_what_the_publisher_used():
    ledger = PublishLedger({"ctl/s": 1})
    claims = PublishLedger.count(["emb/s/vision", "emb/s/vision", "emb/s/audio"])
    ledger.claim(claims)
    # The publisher sent one vision record (seq 0), then its process died: no reply.
    used = {"emb/s/vision": 1, "emb/s/audio": 0}
    resume = ledger.resume_point()
    assert all(resume.get(t, 0) >= n for t, n in used.items())  # a gap, never a repeat
    assert resume == {"ctl/s": 1, "emb/s/vision": 2, "emb/s/audio": 1}


def test_a_refused_call_gives_its_seqs_back():
    ledger = PublishLedger({"ctl/s": 1})
    ledger.claim({"ctl/s": 1})
    ledger.refund({"ctl/s": 1})  # PublisherRestartedError: the call consumed no seq
    assert ledger.resume_point() == {"ctl/s": 1}


def test_the_publishers_own_table_only_moves_the_ledger_forward():
    ledger = PublishLedger({"ctl/s": 1})
    ledger.claim({"emb/s/imu": 2})
    ledger.settle({"emb/s/imu": 2, "ctl/s": 3})  # the driver's start and another writer's messages
    ledger.settle({"ctl/s": 2})
    assert ledger.resume_point() == {"ctl/s": 3, "emb/s/imu": 2}
    ledger.resumed()
    assert ledger.restarts == 1


# -- session statistics ---------------------------------------------------------------------------------
def test_session_result_has_the_summary_shape_and_keeps_publisher_errors_apart():
    stats = SessionStats("kitchen")
    stats.record_published([("vision", 9.0), ("vision", 9.5), ("audio", 9.9)], t_pub=10.0)
    stats.stream_ended("cam", "decode failed", {"late": 2})
    stats.publisher_lost("publisher lost: gone")
    dropped = merge_dropped({("mic", "late"): 1}, stats.source_dropped, {"vision:encoder_error": 3})
    res = stats.result(windows=4, dropped=dropped, missing={"cam": 1}, encode_retries=2, publisher_restarts=1,
                       stages={"total": {"n": 3}})
    assert res.errors == {"cam": "decode failed"} and res.publisher_error == "publisher lost: gone"
    d = res.to_dict()
    assert list(d) == ["session", "windows", "counts", "dropped", "missing", "errors", "latency_p50_s",
                       "latency_p99_s", "encode_retries", "publisher_restarts", "stages"]
    assert d["errors"] == {"cam": "decode failed", "publisher": "publisher lost: gone"}
    assert d["counts"] == {"vision": 2, "audio": 1}
    assert d["dropped"] == {"mic:late": 1, "cam:late": 2, "vision:encoder_error": 3}
    assert d["latency_p50_s"] == pytest.approx(0.5)
    assert SessionResult.from_dict(d) == res
    text = "\n".join(res.lines())
    assert "FAILED stream 'cam': decode failed" in text and "FAILED stream 'publisher'" in text
    assert "p50 500 ms" in text and "resumed 1 time(s)" in text


def test_latencies_are_bounded_to_the_most_recent():
    stats = SessionStats("s", keep=10)
    stats.record_published([("imu", 0.0)] * 100, t_pub=100.0)
    stats.record_published([("imu", 99.0)] * 10, t_pub=100.0)
    res = stats.result(windows=1, dropped={}, missing={})
    assert res.latency_p99_s == pytest.approx(1.0) and res.counts == {"imu": 110}


def test_a_session_whose_process_died_prints_latency_unknown():
    res = SessionResult("s", 2, {}, {}, {}, {"cam": "session process died"}, math.nan, math.nan)
    assert "latency unknown" in res.lines()[0] and res.failed


# -- instrumentation ------------------------------------------------------------------------------------
def test_the_observer_times_each_stage_of_a_published_item_and_forgets_discarded_ones():
    obs = StageObserver("s", metrics=RayMetrics())
    a, b = _item("cam", "vision", 0, t_ingest=1.0), _item("mic", "audio", 0, t_ingest=1.0)
    obs.released([a, b], t_release=1.5)
    obs.forwarded([a, b], [(2.0, 2.25), (2.0, 2.5)])
    obs.published([a], t_pub=3.0)
    obs.discarded([b])
    assert obs.tracked == 0
    s = obs.summary()
    assert s["align_wait"]["p50"] == 0.5 and s["queue"]["p50"] == 0.5 and s["forward"]["p50"] == 0.25
    assert s["publish"]["p50"] == 0.75 and s["total"]["p50"] == 2.0 and s["total"]["n"] == 1
    assert "total_p50_s" in obs.tick(pending=0, dropped={"cam:late": 1})["latency"]
    assert NullObserver().summary() == {} and NullObserver().tick(3, {}) == {}
