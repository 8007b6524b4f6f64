"""Scale-out: the same config on a two-node Ray cluster (two raylets on this machine), sources
placed on one node and encoders on the other through ``ray.*_resources``, replayed end to end."""

from __future__ import annotations

import collections

import pytest

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from pipeline.config import parse_config  # noqa: E402
from sources.demo import write_demo_session  # noqa: E402
from sinks.protocol import decode  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # the local Ray other modules share (conftest.py)
        ray.shutdown()
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"data_node": 100}, "include_dashboard": False})
    gpu_like = c.add_node(num_cpus=1, resources={"encoder_node": 10})
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c, c.head_node.node_id, gpu_like.node_id
    ray.shutdown()
    c.shutdown()


def test_sources_and_encoders_run_on_the_nodes_the_config_names_and_every_window_arrives(cluster, tmp_path):
    import threading

    import zmq

    from pipeline.run import run

    _, data_node, encoder_node = cluster
    sess = write_demo_session(tmp_path / "s", seconds=3.0, seed=2, name="cluster-a")
    cfg = parse_config({
        "sessions": [str(sess)],
        "replay": {"rate": 0, "chunk_seconds": 0.5},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1},
        "encoders": {"replicas": 2, "max_batch": 8, "max_wait_ms": 5},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 60},
        "ray": {"address": "auto", "source_resources": {"data_node": 1}, "encoder_resources": {"encoder_node": 1}},
        "progress": False,
    })
    messages = []

    def subscribe(endpoint: str) -> None:
        ready = threading.Event()

        def loop() -> None:
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.RCVTIMEO, 120_000)
            sock.connect(endpoint)
            sock.subscribe(b"")
            ready.set()
            try:
                while True:
                    msg = decode(sock.recv_multipart())
                    messages.append(msg)
                    if msg.kind == "control" and msg.payload["event"] == "end":
                        return
            finally:
                sock.close(linger=0)

        threading.Thread(target=loop, daemon=True).start()
        ready.wait(10)

    result = run(cfg, on_ready=subscribe)
    assert result.exit_code == 0
    assert {s["node_id"] for s in result.source_stats} == {data_node}
    assert len(result.source_stats) == 6
    assert {e["node_id"] for e in result.encoder_stats} == {encoder_node}

    (summary,) = result.sessions
    end = [m for m in messages if m.kind == "control" and m.payload["event"] == "end"][0].payload
    embs = collections.Counter((m.payload["modality"], m.payload["window"]) for m in messages if m.kind == "embedding")
    assert all(n == 1 for n in embs.values())
    assert end["windows"] == summary["windows"] >= 3
    assert dict(collections.Counter(m for m, _ in embs)) == end["counts"] == summary["counts"]
    assert end["counts"]["imu"] == summary["windows"]  # the IMU covers every window
    assert set(end["counts"]) >= {"vision", "audio", "imu", "depth", "thermal"}
