"""The one-process runtime (no Ray): same windows and embeddings as the aligner + model directly,
published through a real sink, with per-stage latencies for every embedding."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest

from sources.demo import write_demo_session
from pipeline.inprocess import run_inprocess, session_windows
from pipeline.metrics import STAGES
from sources.session import load_session
from sinks.memory import ListSink


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return write_demo_session(tmp_path_factory.mktemp("s") / "a", seconds=4.0, seed=3, name="inproc-a")


@pytest.fixture(scope="module")
def model():
    from encoders.imagebind import load

    return load("imagebind_tiny", "none", device="cpu", precision="fp32", seed=0)


def _expected(session_dir):
    return session_windows(load_session(session_dir), chunk_seconds=0.5)


def test_every_window_is_published_once_in_order_with_the_direct_encoder_output(session_dir, model):
    from encoders.preprocess import prepare

    sink = ListSink(model_name="imagebind_tiny")
    result = run_inprocess([load_session(session_dir)], model, sink, max_batch=3, max_wait_s=0.0)
    windows = _expected(session_dir)
    expected = {(it.modality, it.window): it for w in windows for it in w.items}
    got = {}
    for m in sink.embeddings():
        key = (m.payload["modality"], m.payload["window"])
        assert key not in got, f"duplicate {key}"
        got[key] = np.frombuffer(m.payload["embedding"], dtype="<f4")
    assert set(got) == set(expected)
    by_modality = collections.defaultdict(list)
    for m in sink.embeddings():
        by_modality[m.payload["modality"]].append(m.payload["window"])
    assert all(ws == sorted(ws) for ws in by_modality.values())
    for (modality, window), it in expected.items():
        direct = model.encode(modality, prepare(modality, [it.payload], "cpu")).numpy()[0]
        np.testing.assert_allclose(got[(modality, window)], direct, atol=1e-5, err_msg=f"{modality}/{window}")

    (summary,) = result.sessions
    assert summary["windows"] == len(windows) and summary["errors"] == {}
    end = [m for m in sink.messages if m.topic == "ctl/inproc-a" and m.payload["event"] == "end"][0].payload
    assert end["windows"] == len(windows) and end["counts"] == summary["counts"]
    assert set(result.stages) == set(STAGES)
    assert result.stages["total"]["n"] == result.stages["fill"]["n"] == len(expected)
    assert result.stages["fill"]["p50"] >= 0.0
    assert max(result.batch_sizes["vision"]) <= 3


def test_a_broken_stream_is_reported_and_the_others_complete(tmp_path, session_dir, model):
    sess = tmp_path / "broken"
    shutil.copytree(session_dir, sess)
    video = sess / "video.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    sink = ListSink(model_name="imagebind_tiny")
    result = run_inprocess([load_session(sess)], model, sink)
    (summary,) = result.sessions
    assert "cam" in summary["errors"] or "mic" in summary["errors"]
    assert summary["counts"].get("imu", 0) == summary["windows"] > 0


def test_the_stream_guard_runs_in_process_too(tmp_path, session_dir, model):
    """A clock jump in the IMU file is dropped and counted as in the Ray graph (sources/guard.py)."""
    sess = tmp_path / "jump"
    shutil.copytree(session_dir, sess)
    imu = sess / "imu.csv"
    lines = imu.read_text().splitlines()
    row = lines[100].split(",")
    row[0] = str(float(row[0]) + 1e6)  # one wild timestamp, far beyond max_gap_s
    lines[100] = ",".join(row)
    imu.write_text("\n".join(lines) + "\n")
    sink = ListSink(model_name="imagebind_tiny")
    result = run_inprocess([load_session(sess)], model, sink)
    (summary,) = result.sessions
    assert summary["dropped"].get("imu:jump") == 1, summary["dropped"]
    assert summary["errors"] == {} and summary["counts"]["imu"] == summary["windows"]


class _StepClock:
    """A wall clock that moves 0.1 ms per reading; a test moves ``now`` further by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        t = self.now
        self.now += 1e-4
        return t


class _SlowSessionSink(ListSink):
    """Publishing a batch of session ``slow`` takes 5 s on ``clock``. Records every embedding's
    latency as the runtime measures it: the clock's next reading (taken right after publish)
    minus the record's ingest time."""

    def __init__(self, clock: _StepClock) -> None:
        super().__init__(model_name="imagebind_tiny")
        self._clock_ = clock
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)

    def publish(self, records):
        records = list(records)
        n = super().publish(records)
        if records and records[0].session == "slow":
            self._clock_.now += 5.0
        for r in records:
            self.latencies[r.session].append(self._clock_.now - r.t_ingest)
        return n


def test_each_sessions_latency_percentiles_come_from_its_own_embeddings(tmp_path, session_dir, model):
    slow = write_demo_session(tmp_path / "slow", seconds=2.0, seed=4, name="slow")
    clock = _StepClock()
    sink = _SlowSessionSink(clock)
    result = run_inprocess([load_session(session_dir), load_session(slow)], model, sink, clock=clock)
    by_name = {s["session"]: s for s in result.sessions}
    assert set(sink.latencies) == {"inproc-a", "slow"}
    for name, lat in sink.latencies.items():
        assert by_name[name]["latency_p50_s"] == pytest.approx(np.percentile(lat, 50), abs=1e-6), name
        assert by_name[name]["latency_p99_s"] == pytest.approx(np.percentile(lat, 99), abs=1e-6), name
    # The two sessions' figures differ, so figures pooled over both could not pass the checks above.
    assert by_name["slow"]["latency_p50_s"] >= 5.0
    assert by_name["inproc-a"]["latency_p50_s"] != pytest.approx(by_name["slow"]["latency_p50_s"], abs=0.5)


def test_a_configured_imu_span_is_resampled_over_that_span(session_dir, model):
    """``window.spans.imu.span: 3`` from a run config: each published IMU embedding is the model's
    output for its 3 s window resampled over 3 s, not over the tower's 5 s (which would hold the
    last sample for the 2 s the window does not have)."""
    import torch

    from encoders.preprocess import prepare
    from pipeline.config import parse_config

    cfg = parse_config({"sessions": [str(session_dir)], "model": {"config": "imagebind_tiny"},
                        "window": {"spans": {"imu": {"span": 3.0}}}})
    sink = ListSink(model_name="imagebind_tiny")
    run_inprocess([load_session(session_dir)], model, sink, align=cfg.align, max_wait_s=0.0)
    got = {m.payload["window"]: np.frombuffer(m.payload["embedding"], dtype="<f4")
           for m in sink.embeddings() if m.payload["modality"] == "imu"}
    items = [it for w in session_windows(load_session(session_dir), cfg.align, chunk_seconds=0.5)
             for it in w.items if it.modality == "imu"]
    assert items and set(got) == {it.window for it in items}
    with torch.no_grad():
        over_3s = model.encode("imu", prepare("imu", [it.payload for it in items], imu_duration=3.0)).numpy()
        over_5s = model.encode("imu", prepare("imu", [it.payload for it in items])).numpy()
    for it, want, wrong in zip(items, over_3s, over_5s):
        np.testing.assert_allclose(got[it.window], want, atol=1e-5, err_msg=f"imu window {it.window}")
        assert np.abs(want - wrong).max() > 1e-4  # the two readings differ: the test can tell them apart
