"""The pipeline's Ray metrics come out of Ray's Prometheus endpoint (docs/deploy.md).

A demo session is replayed through the real Ray graph in a child process that starts its own Ray
with a metrics export port (the other tests share one module-scoped Ray without it); the test
scrapes ``http://127.0.0.1:PORT/metrics`` over HTTP, as Prometheus would, and checks the
bindstream series against what the run published. Ray exports metrics only through its
dashboard agent, which needs ``ray[default]``; without it the test skips and says so.

This file is also the child: ``python tests/test_metrics_export.py PORT SESSION_DIR OUT_JSON``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.metrics import STAGES

REPO = Path(__file__).resolve().parents[1]
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metrics_agent_missing() -> str | None:
    """Why Ray cannot export metrics here, or None when it can."""
    try:
        # Ray's own test for ray[default]: it starts the dashboard agent, which serves the
        # metrics port, only when these imports succeed.
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        return f"Ray's metrics agent needs ray[default] (pip install 'ray[default]'): {exc}"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode("utf-8", "replace")


def _samples(body: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in a Prometheus text exposition."""
    out = []
    for line in body.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name:
            out.append((dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def _total(body: str, name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels`` (one series per worker)."""
    return sum(v for lab, v in _samples(body, name) if all(lab.get(k) == w for k, w in labels.items()))


# -- the child: its own Ray with a metrics port, one replay, then the scrape ---------------------
def _child(port: int, session_dir: str, out_path: str) -> None:
    import ray

    from pipeline.config import parse_config
    from pipeline.run import run

    # Workers push their metrics to the agent every metrics_report_interval_ms (10 s by default).
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    cfg = parse_config({
        "sessions": [session_dir],
        "replay": {"rate": 0, "chunk_seconds": 0.5},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu",
                  "threads": 1},
        "encoders": {"replicas": 1, "max_batch": 4, "max_wait_ms": 5},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 0, "heartbeat_s": 0.5},
        "progress": False,
    })
    result = run(cfg)
    session = result.sessions[0]
    published = sum(session["counts"].values())
    # The run has ended and its actors are gone; what they reported before stays on the
    # endpoint. Wait until the agent shows every published embedding, or the agent has had
    # ample time (a loaded machine) to export everything reported: the actors' last report
    # interval before ray.kill may never arrive.
    items = {}
    for e in result.encoder_stats:
        for m, n in e["items"].items():
            items[m] = items.get(m, 0) + n
    body, deadline = "", time.time() + 15
    while time.time() < deadline:
        try:
            body = _scrape(port)
        except OSError:
            body = ""
        if (_total(body, "ray_bindstream_embeddings_total") >= published
                and all(_total(body, "ray_bindstream_batch_size_count", modality=m) for m in items)):
            break
        time.sleep(0.5)
    Path(out_path).write_text(json.dumps({"session": session["session"], "counts": session["counts"],
                                          "items": items, "body": body}))
    ray.shutdown()


# -- the test -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("ray")
    why = _metrics_agent_missing()
    if why:
        pytest.skip(why)
    from sources.demo import write_demo_session

    root = tmp_path_factory.mktemp("metrics")
    session = write_demo_session(root / "sess", seconds=3.0, size=(160, 120), fps=15)
    out = root / "out.json"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_enable_metrics_collection": "1"}  # conftest.py turns it off for everything else
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(port), str(session), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_embeddings_counter_counts_the_published_embeddings(scraped: dict) -> None:
    body, session = scraped["body"], scraped["session"]
    assert body, "nothing scraped from Ray's Prometheus endpoint"
    assert scraped["counts"], "the replay published nothing"
    for modality, n in scraped["counts"].items():
        exported = _total(body, "ray_bindstream_embeddings_total", session=session, modality=modality)
        # An actor's last report interval can be lost when the run ends and kills it
        # (docs/deploy.md): never more than was published, and something of every modality.
        assert 1 <= exported <= n, (modality, exported, n)


def test_stage_latency_histograms_cover_every_counted_embedding(scraped: dict) -> None:
    body, session = scraped["body"], scraped["session"]
    # The aligner records an embedding's stages and counts it in the same step, and a worker
    # reports all its metrics at once: the histograms and the counter agree in any scrape.
    counted = _total(body, "ray_bindstream_embeddings_total", session=session)
    assert counted > 0
    name = "ray_bindstream_stage_latency_seconds"
    for stage in STAGES:
        count = _total(body, f"{name}_count", session=session, stage=stage)
        # ``fill`` is skipped where a window's first sample time is unknown
        assert (count <= counted) if stage == "fill" else (count == counted), stage
        # cumulative buckets: the +Inf bucket holds every observation, the smaller ones fewer
        assert _total(body, f"{name}_bucket", session=session, stage=stage, le="+Inf") == count, stage
        assert _total(body, f"{name}_bucket", session=session, stage=stage, le="0.001") <= count, stage
        assert math.isfinite(_total(body, f"{name}_sum", session=session, stage=stage)), stage
    # latency from sample in to published contains the forward pass; both are plausible (the
    # sums are Ray's bucket-midpoint estimates, monotonic in the true values)
    mean_total = _total(body, f"{name}_sum", session=session, stage="total") / counted
    mean_fwd = _total(body, f"{name}_sum", session=session, stage="forward") / counted
    assert 0 < mean_fwd <= mean_total < 300


def test_batch_size_histogram_counts_batches_within_max_batch(scraped: dict) -> None:
    body = scraped["body"]
    assert scraped["items"], "the encoders encoded nothing"
    # The encoder's last report interval can be lost when the run ends and kills it
    # (docs/deploy.md): a modality encoded only then (a single caption) may show no batch.
    exported = 0.0
    for modality, n in scraped["items"].items():
        batches = _total(body, "ray_bindstream_batch_size_count", modality=modality)
        exported += batches
        assert batches <= n, (modality, batches, n)  # every batch holds at least one item
        # every batch within max_batch (4). Bucket counts are exact; Ray rebuilds a histogram's
        # _sum from bucket midpoints, so sums and means are estimates (docs/deploy.md).
        assert _total(body, "ray_bindstream_batch_size_bucket", modality=modality, le="4.0") == batches, modality
        assert _total(body, "ray_bindstream_batch_size_bucket", modality=modality, le="+Inf") == batches, modality
    assert exported >= 1, "no batch exported"
    assert _samples(body, "ray_bindstream_encoder_queue_depth"), "queue depth gauge not exported"
    assert _samples(body, "ray_bindstream_pending_windows"), "pending windows gauge not exported"


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3])
