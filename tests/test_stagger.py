"""Several sessions end their windows spread over the hop (``window.stagger``): the rules as plain
functions and in the aligner, then through the real Ray graph: the second of two paced replays
enters its windows half a hop after the first with the same embeddings, and two live rigs' window
ends lie on their own phases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.align import AlignConfig, Aligner, ModalitySpan
from pipeline.run_loop import replay_starts, session_align, stagger_phases
from sources.base import Chunk
from sources.demo import write_demo_session


def test_n_sessions_get_phases_k_over_n_of_a_hop_and_one_session_or_no_stagger_none():
    assert stagger_phases(4, 2.0, True) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert stagger_phases(1, 2.0, True) is None
    assert stagger_phases(3, 2.0, False) is None


def test_replayed_sessions_start_their_clocks_their_phase_later_in_wall_time_and_live_ones_do_not():
    # a hop of stream time is half a second of wall time at rate 2
    assert replay_starts(100.0, [False] * 4, stagger_phases(4, 1.0, True), rate=2.0) == pytest.approx(
        [100.0, 100.125, 100.25, 100.375])
    assert replay_starts(10.0, [False, True, False], stagger_phases(3, 3.0, True), rate=1.0) == pytest.approx(
        [10.0, 10.0, 12.0])


@pytest.mark.parametrize("phases, rate", [(None, 1.0), ([0.0, 0.5], 0.0)])
def test_without_phases_or_pacing_every_session_starts_together(phases, rate):
    assert replay_starts(5.0, [False, False], phases, rate) == [5.0, 5.0]


def test_only_a_live_session_with_an_auto_origin_takes_its_phase_into_its_window_rule():
    auto, fixed = AlignConfig(hop=1.0), AlignConfig(hop=1.0, origin=3.0)
    assert session_align(auto, True, 0.25).phase == 0.25
    assert session_align(auto, False, 0.25) is auto  # replay: its clock moves instead
    assert session_align(fixed, True, 0.25) is fixed  # a configured origin stays
    assert session_align(auto, True, None) is auto


def _imu(t: np.ndarray, stream: str = "imu") -> Chunk:
    return Chunk(stream, "imu", t, np.zeros((len(t), 6), np.float32))


def test_a_phase_moves_the_grid_back_onto_it_the_first_window_shorter_and_no_sample_lost():
    span = {"imu": ModalitySpan(span=1.0)}
    al = Aligner("s", {"imu": "imu"}, AlignConfig(hop=1.0, phase=0.25, spans=span), clock=lambda: 0.0)
    t = 10.3 + 0.01 * np.arange(270)
    windows = al.push(_imu(t)) + al.end_stream("imu")
    assert al.origin == pytest.approx(10.25)  # the latest 0.25 + m at or before the first sample
    assert [w.t_end for w in windows] == pytest.approx([11.25, 12.25, 13.25])
    assert windows[0].items[0].t_start == pytest.approx(10.3)  # the first window: 10.3 .. 11.25
    used = sum(int(np.sum((t >= it.t_start) & (t <= it.t_end))) for w in windows for it in w.items)
    assert used == len(t), "every sample is in exactly one window (span = hop)"
    assert not al.dropped


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("stagger")
    return (write_demo_session(root / "a", seconds=4.0, seed=0, name="stag-a"),
            write_demo_session(root / "b", seconds=4.0, seed=0, name="stag-b"))


def _entered(messages, session: str) -> dict[int, float]:
    """Per window: the wall time its audio's last sample entered (publish time minus latency)."""
    return {m.payload["window"]: m.payload["t_publish"] - m.payload["latency_s"] for m in messages
            if m.topic == f"emb/{session}/audio"}


@pytest.mark.usefixtures("ray_cluster")
def test_the_second_of_two_paced_sessions_enters_its_windows_half_a_hop_later_with_the_same_embeddings(two_sessions):
    pytest.importorskip("ray")
    from test_pipeline_e2e import _embeddings, _replay

    result, messages = _replay(list(two_sessions), replay={"rate": 1.0, "chunk_seconds": 0.5})
    assert result.exit_code == 0
    a, b = _entered(messages, "stag-a"), _entered(messages, "stag-b")
    assert a and a.keys() == b.keys()
    gap = float(np.median([b[w] - a[w] for w in a]))
    assert 0.3 < gap < 0.7, f"session b's windows entered {gap:.3f} s after a's, expected half a hop (0.5 s)"
    emb = _embeddings(messages)
    # The two sessions hold the same data (same seed): staggering moved when, not what.
    for (session, modality, window), row in emb.items():
        if session == "stag-a":
            assert np.allclose(row, emb[("stag-b", modality, window)], atol=1e-5), (modality, window)


@pytest.mark.usefixtures("ray_cluster")
def test_two_live_rigs_end_their_windows_on_their_own_phases_of_the_hop():
    pytest.importorskip("ray")
    from live_peers import ImuPublisher, free_port
    from pipeline.run import run
    from test_live_faults import _cfg, _live_imu_session
    from test_pipeline_e2e import Subscriber

    ports = [free_port(), free_port()]
    peers = [ImuPublisher(p, time.time(), rate=100, jitter_s=0.0, seed=i) for i, p in enumerate(ports)]
    for peer in peers:
        peer.start()
    hop = 0.5
    cfg = _cfg([_live_imu_session(s, p) for s, p in zip(("rig-a", "rig-b"), ports)], stop_after=4.0,
               window={"hop": hop, "spans": {"imu": {"span": hop}}})
    sub = Subscriber(2)
    try:
        result = run(cfg, on_ready=sub.start)
        sub.join()
    finally:
        for peer in peers:
            peer.halt.set()
    assert result.exit_code == 0
    for session, phase in (("rig-a", 0.0), ("rig-b", hop / 2)):
        ends = [m.payload["t_end"] for m in sub.messages if m.topic == f"emb/{session}/imu"]
        assert len(ends) >= 3, f"{session}: {len(ends)} IMU windows in 4 s"
        # An IMU window's data ends at its last sample, within one 100 Hz period before e_k (the
        # window at the run's start or stop may end elsewhere: the median is checked).
        before_end = [(phase - t) % hop for t in ends]
        assert float(np.median(before_end)) < 0.02, (session, before_end)

