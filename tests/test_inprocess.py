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


def test_each_session_reports_the_latency_of_its_own_embeddings(tmp_path, session_dir, model):
    """Two sessions in one run: each summary's percentiles are those of its own embeddings."""
    fast = load_session(session_dir)
    slow = load_session(write_demo_session(tmp_path / "slow", seconds=3.0, seed=4, name="inproc-slow"))
    now = [0.0]
    own: dict[str, list[float]] = collections.defaultdict(list)

    class SlowSink(ListSink):
        """Publishing for ``inproc-slow`` takes 1 s of the run's clock, for the other 1 ms."""

        def publish(self, records):
            now[0] += 1.0 if records[0].session == "inproc-slow" else 0.001
            own[records[0].session] += [now[0] - r.t_ingest for r in records]
            return super().publish(records)

    sink = SlowSink(model_name="imagebind_tiny")
    result = run_inprocess([fast, slow], model, sink, max_batch=2, max_wait_s=0.0, clock=lambda: now[0])
    by_name = {s["session"]: s for s in result.sessions}
    for name in ("inproc-a", "inproc-slow"):
        assert by_name[name]["latency_p50_s"] == pytest.approx(np.percentile(own[name], 50)), name
        assert by_name[name]["latency_p99_s"] == pytest.approx(np.percentile(own[name], 99)), name
    assert by_name["inproc-slow"]["latency_p50_s"] >= 1.0
