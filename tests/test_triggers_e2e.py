"""Triggers through the full Ray graph: the demo session's planted events are found by an
example-clip trigger, and the events on the wire are the same at replay rate 0 and 1 and with
max_batch 1 and 32. Real actors, real decoding, real sockets, the tiny model's seeded weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import parse_config
from sources.demo import EVENT_CLIP, planted_events, write_demo_session
from test_pipeline_e2e import Subscriber

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_cluster")

REPO = Path(__file__).resolve().parents[1]
SECONDS = 27.0  # three planted events: 3-6 s, 11-14 s, 19-22 s


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_session(tmp_path_factory.mktemp("trig") / "demo", seconds=SECONDS, size=(160, 120), fps=10)


def _trigger(demo: Path) -> dict:
    """configs/demo.yaml's trigger, with the example clip of this session."""
    import yaml

    (trigger,) = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["triggers"]
    trigger = {({True: "on", False: "off"}.get(k, k) if isinstance(k, bool) else k): v for k, v in trigger.items()}
    return {**trigger, "video": str(demo / EVENT_CLIP)}


def _run(demo: Path, rate: float, max_batch: int, timeline: Path | None = None) -> tuple[list, dict]:
    from pipeline.run import run

    cfg = parse_config({
        "sessions": [str(demo)], "replay": {"rate": rate},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "threads": 1},
        "encoders": {"max_batch": max_batch},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 60},
        "progress": False, "triggers": [_trigger(demo)], "timeline": str(timeline) if timeline else None,
    })
    sub = Subscriber(1)
    result = run(cfg, on_ready=sub.start)
    sub.join()
    assert sub.error is None and result.exit_code == 0, (sub.error, result.sessions)
    return [m for m in sub.messages if m.kind == "trigger"], result.sessions[0]


def _keys(events: list) -> list[tuple]:
    """Each event but its seq and score, in stream and window order: the streams' events share a
    topic, and how they interleave on it depends on timing, not on the data."""
    assert [m.payload["seq"] for m in events] == list(range(len(events)))  # one topic, no gap
    return sorted((m.topic, m.payload["stream"], m.payload["window"], m.payload["event"], m.payload["modality"],
                   m.payload["t_start"], m.payload["t_end"], m.payload.get("reason")) for m in events)


def _scores(events: list) -> list[float]:
    return [m.payload["score"] for m in sorted(events, key=lambda m: (m.payload["stream"], m.payload["window"],
                                                                      m.payload["event"]))]


def test_planted_events_are_found_the_same_at_any_rate_and_batching(demo: Path, tmp_path: Path) -> None:
    reference, summary = _run(demo, rate=0.0, max_batch=32, timeline=tmp_path / "t.html")
    planted = planted_events(SECONDS)
    assert len(planted) == 3
    ends = [m.payload for m in reference if m.payload["event"] == "end"]
    for stream in ("cam", "mic"):  # the clip's picture finds the picture, its sound the sound
        mine = [e for e in ends if e["stream"] == stream]
        hits = [[e for e in mine if e["t_start"] < b and e["t_end"] > a] for a, b in planted]
        assert all(len(h) <= 1 for h in hits), f"{stream}: more than one event for a planted interval: {hits}"
        recall = sum(1 for h in hits if h) / len(planted)
        precision = sum(1 for e in mine if any(e["t_start"] < b and e["t_end"] > a for a, b in planted)) / max(1, len(mine))
        assert recall >= 0.9 and precision >= 0.9, (stream, recall, precision, mine)
        for (a, b), (e,) in zip(planted, hits):  # on the planted times, within a window's span
            assert a - 2.0 <= e["t_start"] <= a + 0.5 and b - 1.0 <= e["t_end"] <= b + 2.0, (a, b, e)
    assert summary["triggers"]["planted"]["events"] == len(ends) == 6
    assert (tmp_path / "t.html").stat().st_size > 1_000_000  # the page, plotly inlined

    for rate, max_batch in ((3.0, 32), (0.0, 1)):  # paced (27 s of session in 9 s) and as fast as it goes
        events, _ = _run(demo, rate=rate, max_batch=max_batch)
        assert _keys(events) == _keys(reference), (rate, max_batch)
        assert _scores(events) == pytest.approx(_scores(reference), abs=1e-4)
