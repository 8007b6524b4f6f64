"""The embedding store through the real Ray graph: what a real SUB socket received is what the
store holds, once per key, across replays and an encoder killed mid-run; a store that cannot be
written fails alone while publishing goes on.

Real Ray actors, real PyAV decoding, real sockets on 127.0.0.1, real LanceDB files.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sinks.protocol import embedding_array
from sinks.store import EmbeddingStore
from sources.demo import write_demo_session
from test_faults import _find_actor, _reference_keys, _run_with_killer
from test_pipeline_e2e import Subscriber, _config

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return write_demo_session(tmp_path_factory.mktemp("store") / "s", seconds=4.0, seed=5, name="store-s")


def _replay(cfg):
    from pipeline.run import run

    sub = Subscriber(len(cfg.sessions))
    result = run(cfg, on_ready=sub.start)
    sub.join()
    return result, sub.messages


def _received(messages) -> dict[tuple, tuple]:
    """(model, session, modality, window) -> (vector, stream, t_start, t_end, t_publish) of every embedding received."""
    out = {}
    for m in messages:
        if m.topic.startswith("emb/"):
            p = m.payload
            key = (p["model"], p["session"], p["modality"], p["window"])
            assert key not in out, f"received twice: {key}"
            out[key] = (embedding_array(m), p["stream"], p["t_start"], p["t_end"], p["t_publish"])
    return out


def _stored(uri) -> dict[tuple, dict]:
    rows = EmbeddingStore.open(uri).table.to_arrow().to_pylist()
    keys = [(r["model"], r["session"], r["modality"], r["window"]) for r in rows]
    dupes = [k for k, n in collections.Counter(keys).items() if n > 1]
    assert not dupes, f"keys stored twice: {dupes[:5]}"
    return dict(zip(keys, rows))


def _end(messages) -> dict:
    (end,) = [m.payload for m in messages if m.topic.startswith("ctl/") and m.payload["event"] == "end"]
    return end


def test_store_holds_exactly_what_the_subscriber_received_and_a_second_replay_replaces_it(session_dir, tmp_path):
    uri = str(tmp_path / "store")
    cfg = _config([session_dir], store={"uri": uri})
    result, messages = _replay(cfg)
    assert result.exit_code == 0, result.sessions
    received = _received(messages)
    stored = _stored(uri)
    assert set(stored) == set(received) and received
    for key, (vec, stream, t_start, t_end, t_publish) in received.items():
        row = stored[key]
        np.testing.assert_allclose(np.asarray(row["vector"], dtype=np.float32), vec, atol=1e-6, err_msg=str(key))
        assert (row["stream"], row["t_start"], row["t_end"], row["t_publish"]) == (stream, t_start, t_end, t_publish)
        assert row["dim"] == vec.size
    (summary,) = result.sessions
    assert summary["store"]["rows"] == len(received) and "store_error" not in summary
    end = _end(messages)
    assert end["store"]["rows"] == len(received) and end["store"]["not_written"] == 0 and "error" not in end["store"]
    first_run = {r["run_id"] for r in stored.values()}

    result2, messages2 = _replay(cfg)
    assert result2.exit_code == 0
    stored2 = _stored(uri)
    assert set(stored2) == set(received), "a second replay changed the keys"
    assert EmbeddingStore.open(uri).count() == len(received)
    second_run = {r["run_id"] for r in stored2.values()}
    assert len(second_run) == 1 and second_run.isdisjoint(first_run), "the rerun did not replace the rows"
    model = EmbeddingStore.open(uri).models()
    assert [(m["model"], m["checkpoint"], m["seed"]) for m in model] == [("imagebind_tiny", "none", 0)]


def test_encoder_killed_mid_run_still_leaves_exactly_once_rows(session_dir, tmp_path):
    uri = str(tmp_path / "store")
    cfg = _config([session_dir], replay={"rate": 4.0}, encoders={"max_batch": 16, "max_wait_ms": 150},
                  store={"uri": uri, "flush_s": 0.2})

    def kill(sub):
        ray.kill(_find_actor("bindstream.encoder.0."), no_restart=False)

    result, messages, mid_replay = _run_with_killer(cfg, kill)
    assert mid_replay, "the replay ended before the encoder was killed; the test proved nothing"
    stored = _stored(uri)  # asserts no key twice
    assert {(s, m, w) for _, s, m, w in stored} == _reference_keys(session_dir, cfg)
    assert set(stored) == set(_received(messages))
    assert result.exit_code == 0


def test_unwritable_store_fails_alone_and_publishing_is_unaffected(session_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be\n")
    cfg = _config([session_dir], store={"uri": str(blocker)})
    result, messages = _replay(cfg)
    received = _received(messages)
    assert {(s, m, w) for _, s, m, w in received} == _reference_keys(session_dir, cfg), "publishing was affected"
    (summary,) = result.sessions
    assert result.exit_code == 5 and not summary["errors"]
    assert str(blocker) in summary["store_error"] and f"{len(received)} row(s) not written" in summary["store_error"]
    end = _end(messages)
    assert end["store"]["rows"] == 0 and end["store"]["not_written"] == len(received) and str(blocker) in end["store"]["error"]
    assert blocker.read_text().startswith("a file")


def test_standalone_consumer_stores_the_same_rows_as_the_run_own_sink(session_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.run import run

    own, other = str(tmp_path / "own"), str(tmp_path / "consumer")
    procs = []

    def on_ready(endpoint):  # the consumer is the one subscriber the replay waits for
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline", "store", endpoint, "--uri", other, "--sessions", "1", "--checkpoint", "none"],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    result = run(_config([session_dir], store={"uri": own}), on_ready=on_ready)
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err
    assert result.exit_code == 0
    a, b = _stored(own), _stored(other)
    assert set(a) == set(b) and a
    for key, row in a.items():
        for col in ("stream", "t_start", "t_end", "t_publish", "dim", "vector"):
            assert row[col] == b[key][col], (key, col)
    assert f"store-s: stored {len(a)} rows in {other}" in out
    assert EmbeddingStore.open(other).models() == EmbeddingStore.open(own).models()
