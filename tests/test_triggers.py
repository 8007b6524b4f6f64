"""The trigger rules as plain classes, on a fake stream clock: hysteresis, min duration,
cooldown, streams interleaved in any order, a stream ending mid-event, calibrated scores."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.triggers import Hysteresis, TriggerEvaluator, TriggerRule


def _run(machine: Hysteresis, scores: list[float], hop: float = 1.0, span: float = 2.0) -> list[tuple]:
    """Window k ends at (k + 1) * hop and uses the data of the last ``span`` seconds."""
    out = []
    for k, s in enumerate(scores):
        t_end = (k + 1) * hop
        out += machine.observe(k, max(0.0, t_end - span), t_end, s)
    return out + machine.close()


def test_an_event_starts_at_on_and_ends_only_below_off() -> None:
    events = _run(Hysteresis(on=0.5, off=0.3), [0.1, 0.45, 0.6, 0.4, 0.35, 0.31, 0.2, 0.1])
    # 0.45 is under on: nothing; 0.6 starts; 0.4..0.31 stay above off: still on; 0.2 ends it.
    assert [(e[0], e[1]) for e in events] == [("start", 2), ("end", 5)]
    start, end = events
    assert start[2:4] == (1.0, 3.0)  # data of window 2: [1, 3]
    assert end[2:6] == (1.0, 6.0, 0.6, "below_off")  # from window 2's data start to window 5's end, peak 0.6


def test_scores_wobbling_between_off_and_on_make_one_event_not_many() -> None:
    events = _run(Hysteresis(on=0.5, off=0.3), [0.6, 0.35, 0.55, 0.32, 0.58, 0.31, 0.1])
    assert [e[0] for e in events] == ["start", "end"]
    # Without hysteresis (off == on) the same scores flicker into three events.
    flicker = _run(Hysteresis(on=0.5, off=0.5), [0.6, 0.35, 0.55, 0.32, 0.58, 0.31, 0.1])
    assert [e[0] for e in flicker] == ["start", "end"] * 3


def test_an_event_must_hold_for_min_duration_in_stream_time() -> None:
    m = Hysteresis(on=0.5, off=0.3, min_duration_s=2.0)
    # A 2-window blip (t_end 2, 3: held 1 s) is no event; 3 windows (held 2 s) is one.
    events = _run(m, [0.0, 0.7, 0.6, 0.1, 0.0, 0.7, 0.6, 0.6, 0.1])
    assert [(e[0], e[1]) for e in events] == [("start", 5), ("end", 7)]
    assert events[0][3] == 8.0  # confirmed at the window ending 2 s after the first's end
    # Half the hop, the same stream time: the same decision needs twice the windows.
    short = _run(Hysteresis(on=0.5, off=0.3, min_duration_s=2.0), [0.0] + [0.7] * 4 + [0.1], hop=0.5)
    fine = _run(Hysteresis(on=0.5, off=0.3, min_duration_s=2.0), [0.0] + [0.7] * 5 + [0.1], hop=0.5)
    assert short == [] and [e[0] for e in fine] == ["start", "end"] and fine[0][1] == 1 and fine[0][3] == 3.0


def test_cooldown_is_stream_time_after_the_end() -> None:
    m = Hysteresis(on=0.5, off=0.3, cooldown_s=3.0)
    scores = [0.7, 0.1, 0.7, 0.7, 0.1, 0.7, 0.1]  # ends at t=1; t=3,4 too soon (< 1 + 3); t=6 may start
    events = _run(m, scores)
    assert [(e[0], e[1]) for e in events] == [("start", 0), ("end", 0), ("start", 3), ("end", 3)]
    # The window ending at t=4 is the first at or after 1 + 3: it starts the second event.


def test_a_stream_ending_mid_event_sends_the_end() -> None:
    events = _run(Hysteresis(on=0.5, off=0.3), [0.1, 0.7, 0.9])
    assert [(e[0], e[1], e[5]) for e in events] == [("start", 1, ""), ("end", 2, "stream_end")]
    assert events[1][4] == 0.9
    # Pending (not yet held long enough) when the stream ends: no event at all.
    assert _run(Hysteresis(on=0.5, off=0.3, min_duration_s=5.0), [0.1, 0.7, 0.9]) == []


def test_a_window_that_does_not_move_the_clock_forward_is_ignored_and_counted() -> None:
    m = Hysteresis(on=0.5, off=0.3)
    assert m.observe(3, 2.0, 4.0, 0.9)[0][0] == "start"
    assert m.observe(2, 1.0, 3.0, 0.0) == [] and m.observe(3, 2.0, 4.0, 0.0) == []
    assert m.ignored == 2 and m.state == Hysteresis.ACTIVE


@dataclass
class _Rec:
    stream: str
    modality: str
    window: int
    t_start: float
    t_end: float
    embedding: np.ndarray


def _axis(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


def _toward(i: int, cos: float, dim: int = 8) -> np.ndarray:
    """A unit vector whose cosine with axis ``i`` is ``cos``."""
    return (cos * _axis(i, dim) + np.sqrt(1 - cos * cos) * _axis(dim - 1, dim)).astype(np.float32)


def _stream(stream: str, modality: str, cosines: list[float], hop: float = 1.0) -> list[_Rec]:
    return [_Rec(stream, modality, k, max(0.0, (k + 1) * hop - 2), (k + 1) * hop, _toward(0, c))
            for k, c in enumerate(cosines)]


def _evaluator(**rule) -> TriggerEvaluator:
    return TriggerEvaluator("s", [TriggerRule("bark", **{"on": 0.5, "off": 0.3, **rule})], {"bark": {"text": _axis(0)}})


def test_streams_interleaved_in_any_order_give_the_same_events() -> None:
    """Windows of different streams (modalities) reach the evaluator in whatever order the
    publisher's batches hold them; each stream's own stay in window order."""
    cam = _stream("cam", "vision", [0.1, 0.6, 0.7, 0.2, 0.1, 0.8, 0.8])
    mic = _stream("mic", "audio", [0.6, 0.6, 0.1, 0.1, 0.55, 0.9, 0.2])
    imu = _stream("imu", "imu", [0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])

    def events(order: list[_Rec], batch: int) -> list[tuple]:
        ev = _evaluator(modalities=("vision", "audio"))
        out = []
        for i in range(0, len(order), batch):
            out += ev.observe(order[i:i + batch])
        out += ev.close()
        return sorted(e.key() for e in out)

    reference = events(cam + mic + imu, 100)
    assert len(reference) == 8  # start and end of 2 events on cam (the second ends with it) and 2 on mic
    assert {k[1] for k in reference} == {"cam", "mic"}  # imu is not watched
    rng = random.Random(0)
    for _ in range(20):
        queues = [list(cam), list(mic), list(imu)]
        merged = []
        while any(queues):
            q = rng.choice([q for q in queues if q])
            merged.append(q.pop(0))
        assert events(merged, rng.choice([1, 2, 5, 32])) == reference


def test_summary_counts_events_and_their_stream_duration_per_trigger() -> None:
    ev = _evaluator()
    ev.observe(_stream("cam", "vision", [0.1, 0.7, 0.7, 0.1, 0.9]))
    ev.close()
    assert ev.summary() == {"bark": {"events": 2, "duration_s": pytest.approx((3 - 0) + (5 - 3))}}


def test_calibrated_score_is_the_softmax_against_the_background() -> None:
    bg = np.stack([_axis(1), _axis(2)])
    ev = TriggerEvaluator("s", [TriggerRule("a", score="calibrated", temperature=0.1, on=0.5, off=0.4)],
                          {"a": {"text": _axis(0)}}, background=bg)
    x = (0.6 * _axis(0) + 0.3 * _axis(1) + np.sqrt(1 - 0.45) * _axis(3)).astype(np.float32)
    names, scores = ev.scores("vision", x)
    logits = np.array([0.6, 0.3, 0.0]) / 0.1
    assert names == ["a"] and scores[0] == pytest.approx(np.exp(logits[0]) / np.exp(logits).sum(), rel=1e-5)
    # The same raw cosine against a background it beats less: lower calibrated score.
    y = (0.6 * _axis(0) + 0.55 * _axis(1) + np.sqrt(1 - 0.36 - 0.3025) * _axis(3)).astype(np.float32)
    assert ev.scores("vision", y)[1][0] < scores[0]


def test_a_window_is_scored_against_the_prompt_of_its_own_modality_where_there_is_one() -> None:
    ev = TriggerEvaluator("s", [TriggerRule("clip")], {"clip": {"vision": _axis(0), "audio": _axis(1)}})
    assert ev.scores("vision", _axis(0))[1][0] == pytest.approx(1.0)
    assert ev.scores("audio", _axis(1))[1][0] == pytest.approx(1.0)
    assert ev.scores("depth", _axis(0))[1][0] == pytest.approx(np.sqrt(0.5))  # the mean of both


def test_a_rule_with_off_above_on_is_refused_naming_the_trigger() -> None:
    with pytest.raises(ValueError, match="trigger 'x'.*off"):
        TriggerRule("x", on=0.2, off=0.3)


@pytest.mark.parametrize("score", ["cosine", "calibrated"])
def test_an_on_no_score_can_reach_or_not_finite_is_refused_naming_the_trigger(score: str) -> None:
    with pytest.raises(ValueError, match="trigger 'x'.*above 1.*never fire"):
        TriggerRule("x", on=1.5, off=0.3, score=score)
    with pytest.raises(ValueError, match="trigger 'x'.*finite"):
        TriggerRule("x", on=0.5, off=float("-inf"), score=score)
    assert TriggerRule("x", on=1.0, off=0.9, score=score).on == 1.0  # a perfect match still fires


@pytest.mark.parametrize("seed", range(5))
def test_any_batching_gives_the_same_events(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cos = list(np.clip(np.cumsum(rng.normal(0, 0.15, 60)), -0.9, 0.95))
    recs = _stream("cam", "vision", cos, hop=0.5)
    runs = []
    for batch in (1, 3, 7, 60):
        ev = _evaluator(min_duration_s=1.0, cooldown_s=2.0)
        out = list(itertools.chain.from_iterable(ev.observe(recs[i:i + batch]) for i in range(0, 60, batch)))
        runs.append([e.key() for e in out + ev.close()])
    assert all(r == runs[0] for r in runs)
