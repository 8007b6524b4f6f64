"""Sessions replayed together start their replay clocks spread over one hop (``replay.stagger``):
the rule as a plain function, then through the real Ray graph, where the second of two paced
sessions enters its windows half a hop after the first and publishes the same embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.run_loop import replay_starts
from sources.demo import write_demo_session


def test_n_replayed_sessions_start_k_over_n_of_a_hop_apart_in_wall_time():
    starts = replay_starts(100.0, [False] * 4, hop=1.0, rate=2.0, stagger=True)
    # a hop of stream time is half a second of wall time at rate 2
    assert starts == pytest.approx([100.0, 100.125, 100.25, 100.375])


def test_live_sessions_keep_the_common_start_and_are_not_counted():
    starts = replay_starts(10.0, [False, True, False], hop=2.0, rate=1.0, stagger=True)
    assert starts == pytest.approx([10.0, 10.0, 11.0])


@pytest.mark.parametrize("rate, stagger, n", [(1.0, False, 3), (0.0, True, 3), (1.0, True, 1)])
def test_without_stagger_pacing_or_a_second_session_every_session_starts_together(rate, stagger, n):
    assert replay_starts(5.0, [False] * n, hop=1.0, rate=rate, stagger=stagger) == [5.0] * n


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
