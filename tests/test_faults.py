"""Faults with real actors: encoders and the publisher killed mid-replay (restarted by Ray), a
session's process killed.

Real Ray actors, real processes killed with ``ray.kill`` or SIGKILL, real sockets. A kill is
made while the subscriber is still receiving (before the session's ``end``), and the test
checks the kill landed that way; what is asserted is what a subscriber sees.
"""

from __future__ import annotations

import collections
import io
import os
import signal
import threading
import time
from contextlib import redirect_stdout

import numpy as np
import pytest

from sources.demo import write_demo_session
from sinks.protocol import embedding_array
from test_pipeline_e2e import Subscriber, _config, _expected_windows

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return write_demo_session(tmp_path_factory.mktemp("faults") / "s", seconds=5.0, seed=3, name="fault-s")


def _reference_keys(session_dir, cfg) -> set[tuple[str, str, int]]:
    """(session, modality, window) of every item the aligner makes from the session in process."""
    spec, windows = _expected_windows(session_dir, cfg)
    return {(spec.name, it.modality, it.window) for w in windows for it in w.items}


def _find_actor(prefix: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors(all_namespaces=False)]
        hits = [n for n in names if n.startswith(prefix)]
        if hits:
            return ray.get_actor(hits[0])
        time.sleep(0.05)
    raise AssertionError(f"no actor named {prefix}*")


def _embeddings_so_far(sub: Subscriber) -> int:
    return sum(1 for m in list(sub.messages) if m.topic.startswith("emb/"))


def _ended(sub: Subscriber) -> bool:
    return any(m.topic.startswith("ctl/") and m.payload["event"] == "end" for m in list(sub.messages))


def _run_with_killer(cfg, kill, after_embeddings: int = 3):
    """Run ``cfg``; ``kill(sub)`` runs in a thread once ``after_embeddings`` embeddings arrived.
    Returns (result, messages, whether the kill happened before the subscriber saw the end)."""
    from pipeline.run import run

    sub = Subscriber(len(cfg.sessions))
    state = {"mid_replay": None, "error": None}

    def killer():
        try:
            deadline = time.monotonic() + 120
            while _embeddings_so_far(sub) < after_embeddings and time.monotonic() < deadline:
                time.sleep(0.01)
            kill(sub)
            state["mid_replay"] = not _ended(sub)
        except BaseException as exc:  # surfaced below
            state["error"] = exc

    threads = []

    def on_ready(endpoint):
        sub.start(endpoint)
        threads.append(threading.Thread(target=killer, daemon=True))
        threads[-1].start()

    result = run(cfg, on_ready=on_ready)
    sub.join()
    for th in threads:  # the kill must be over before its outcome is judged
        th.join(60)
    if state["error"]:
        raise state["error"]
    return result, sub.messages, state["mid_replay"]


def _published(messages) -> list[tuple[str, str, int]]:
    return [(m.payload["session"], m.payload["modality"], m.payload["window"])
            for m in messages if m.topic.startswith("emb/")]


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killed_encoder_restarts_and_every_window_arrives_exactly_once(session_dir, how):
    # Slow paced replay and long batch waits keep batches in flight inside the encoder.
    cfg = _config([session_dir], replay={"rate": 4.0}, encoders={"max_batch": 16, "max_wait_ms": 150})
    pids = {}

    def kill(sub):
        enc = _find_actor("bindstream.encoder.0.")
        pids["before"] = ray.get(enc.info.remote())["pid"]
        if how == "ray.kill":
            ray.kill(enc, no_restart=False)
        else:
            os.kill(pids["before"], signal.SIGKILL)

    result, messages, mid_replay = _run_with_killer(cfg, kill)
    # The restarted encoder reports its process at the end of the run (polling it from the
    # killer thread raced with the run's own teardown).
    pids["after"] = result.encoder_stats[0]["pid"]
    assert mid_replay, "the replay ended before the encoder was killed; the test proved nothing"
    assert pids["after"] != pids["before"], "the encoder was not restarted in a new process"
    published = _published(messages)
    dupes = [k for k, n in collections.Counter(published).items() if n > 1]
    assert not dupes, f"windows delivered twice: {dupes[:5]}"
    assert set(published) == _reference_keys(session_dir, cfg), "windows lost"
    (summary,) = result.sessions
    assert result.exit_code == 0 and not summary["errors"]
    assert not any(k.endswith("encoder_error") for k in summary["dropped"]), summary["dropped"]
    # seq stays contiguous per topic: nothing lost from the subscriber's point of view
    by_topic = collections.defaultdict(list)
    for m in messages:
        if m.topic.startswith("emb/"):
            by_topic[m.topic].append(m.payload["seq"])
    assert all(s == list(range(len(s))) for s in by_topic.values())
    assert all(np.isfinite(embedding_array(m)).all() for m in messages if m.topic.startswith("emb/"))


def _kill_mid_replay(session_dirs, actor_prefix: str, **over):
    """Replay in real time (the sources read for the whole 5 s, so a kill right after the first
    embeddings lands while they are still running), SIGKILL the process of the actor named
    ``actor_prefix*`` then, and check the run ends with exit 3 and publishes nothing twice.
    Returns the config, the run result, the published keys of ``fault-s``, its summary, its ``end``
    payload and every session's published keys."""
    cfg = _config(session_dirs, replay={"rate": 1.0}, **over)

    def kill(sub):
        actor = _find_actor(actor_prefix)
        os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)

    result, messages, mid_replay = _run_with_killer(cfg, kill, after_embeddings=1)
    assert mid_replay, "the replay ended before the process was killed"
    assert result.exit_code == 3
    summary = next(s for s in result.sessions if s["session"] == "fault-s")
    published = [k for k in _published(messages) if k[0] == "fault-s"]
    assert published and len(published) == len(set(published))
    end = [m for m in messages if m.topic == "ctl/fault-s" and m.payload["event"] == "end"][0].payload
    return cfg, result, published, summary, end, _published(messages)


@pytest.fixture(scope="module")
def other_session_dir(tmp_path_factory):
    return write_demo_session(tmp_path_factory.mktemp("faults") / "t", seconds=5.0, seed=4, name="fault-t")


def test_killed_aligner_process_fails_every_stream_of_its_session_with_exit_3_and_other_sessions_complete(
        session_dir, other_session_dir):
    from pipeline.__main__ import _print_summary

    # A session's streams are read in threads of its aligner's process. Killing that process
    # ends the session: the driver names every stream and sends the session's end; the other
    # session is untouched.
    cfg, result, published, summary, end, everything = _kill_mid_replay(
        [session_dir, other_session_dir], "bindstream.aligner.fault-s.")
    assert set(summary["errors"]) == {"cam", "captions", "depth", "imu", "mic", "thermal"}
    assert all("died" in e for e in summary["errors"].values())
    assert set(published) < _reference_keys(session_dir, cfg)
    assert sorted(end["errors"]) == sorted(summary["errors"])
    # the end (sent by the driver) counts what subscribers got
    got = collections.Counter(k[1] for k in published)
    assert end["counts"] == dict(got) == summary["counts"]
    out = io.StringIO()
    with redirect_stdout(out):
        _print_summary(result)
    assert "FAILED stream 'cam'" in out.getvalue() and "latency unknown" in out.getvalue()

    other = next(s for s in result.sessions if s["session"] == "fault-t")
    assert not other["errors"]
    got_other = [k for k in everything if k[0] == "fault-t"]
    assert len(got_other) == len(set(got_other))
    assert set(got_other) == _reference_keys(other_session_dir, cfg), "the other session must complete"


def _split_at_restart(seqs: list[int], windows: list[int]) -> int | None:
    """Where a topic's messages pass from the killed publisher to the restarted one: the first
    message after a ``seq`` gap or a window that goes back (a re-sent batch). None: no trace."""
    for i in range(1, len(seqs)):
        if seqs[i] != seqs[i - 1] + 1 or windows[i] <= windows[i - 1]:
            return i
    return None


def test_killed_publisher_restarts_on_the_same_endpoint_and_resumes_seq_without_reuse(session_dir):
    cfg = _config([session_dir], replay={"rate": 4.0})
    seen = {}

    def kill(sub):
        pub = _find_actor("bindstream.publisher.")
        seen["pid_before"] = ray.get(pub.pid.remote())
        seen["endpoint_before"] = ray.get(pub.endpoint.remote())
        os.kill(seen["pid_before"], signal.SIGKILL)
        seen["received_at_kill"] = len(sub.messages)

    result, messages, mid_replay = _run_with_killer(cfg, kill)
    assert mid_replay, "the replay ended before the publisher was killed; the test proved nothing"
    # The publisher's stats are collected at the end of the run: from its new incarnation.
    pub = result.publisher_stats
    assert pub["restarted"] and pub["pid"] != seen["pid_before"], "the publisher was not restarted in a new process"
    assert pub["endpoint"] == seen["endpoint_before"] == result.endpoint, "the restart bound another endpoint"
    (summary,) = result.sessions
    assert result.exit_code == 0 and not summary["errors"], summary["errors"]
    assert summary["publisher_restarts"] >= 1
    # The same SUB socket (never reconnected by the test) kept receiving from the new process.
    after = [m for m in messages[seen["received_at_kill"]:] if m.topic.startswith("emb/")]
    assert after, "nothing received after the restart"
    assert messages[-1].topic == "ctl/fault-s" and messages[-1].payload["event"] == "end"

    by_topic = collections.defaultdict(list)
    for m in messages:
        by_topic[m.topic].append(m)
    # No seq is ever reused: strictly increasing on every topic, control topic included (the
    # start repeated for the subscriber as it reconnects has no seq: docs/protocol.md).
    for topic, msgs in by_topic.items():
        seqs = [m.payload["seq"] for m in msgs if "seq" in m.payload]
        assert all(b > a for a, b in zip(seqs, seqs[1:])), f"{topic}: seq reused or out of order: {seqs}"
    # docs/guarantees.md, publisher restart in replay: everything published after the restart
    # arrives, in order, once; what the dead process had not delivered is a seq gap (no more
    # windows lost than seqs skipped); the batch it was publishing is re-sent, so its windows
    # may arrive a second time (new seqs, after the restart).
    expected = _reference_keys(session_dir, cfg)
    for modality in {k[1] for k in expected}:
        want = sorted(k[2] for k in expected if k[1] == modality)
        msgs = by_topic[f"emb/fault-s/{modality}"]
        seqs = [m.payload["seq"] for m in msgs]
        windows = [m.payload["window"] for m in msgs]
        g = _split_at_restart(seqs, windows)
        if g is None:  # the restart left no trace on this topic: all there, once
            assert windows == want, f"{modality}: windows lost or repeated without a seq gap"
            continue
        before, resumed = windows[:g], windows[g:]
        assert _split_at_restart(seqs[g:], resumed) is None, f"{modality}: more than one break: {seqs}"
        assert resumed == [w for w in want if w >= resumed[0]], f"{modality}: windows published after the restart lost"
        assert before == sorted(set(before)) and set(before) <= set(want)
        lost = [w for w in want if w < resumed[0] and w not in before]
        assert len(lost) <= seqs[g] - seqs[g - 1] - 1, f"{modality}: windows {lost} lost without a seq gap"
    assert all(np.isfinite(embedding_array(m)).all() for m in messages if m.topic.startswith("emb/"))


def test_resumed_sink_continues_seq_without_start_and_never_goes_back():
    from sinks.protocol import EmbeddingRecord
    from sinks.memory import ListSink

    def rec(window):
        return EmbeddingRecord(session="s", stream="cam", modality="vision", window=window, t_start=0.0,
                               t_end=1.0, embedding=np.full(4, 0.5, np.float32), t_ingest=0.0)

    sink = ListSink()
    with pytest.raises(ValueError, match="not started"):
        sink.publish([rec(0)])
    sink.resume_session("s", {"cam": "vision"}, dim=4, next_seq={"emb/s/vision": 7, "ctl/s": 3})
    sink.publish([rec(5)])
    sink.resume_session("s", {"cam": "vision"}, dim=4, next_seq={"emb/s/vision": 2})  # never backwards
    sink.publish([rec(6)])
    sink.heartbeat("s")
    assert [(m.topic, m.seq) for m in sink.messages] == [("emb/s/vision", 7), ("emb/s/vision", 8), ("ctl/s", 3)]
    assert sink.next_seqs("s") == {"emb/s/vision": 9, "ctl/s": 4}
    with pytest.raises(ValueError, match="not one of this session's"):
        sink.resume_session("s", {"cam": "vision"}, dim=4, next_seq={"emb/other/vision": 1})


def test_summary_prints_publisher_hwm_drops():
    from pipeline.__main__ import _print_summary
    from pipeline.run import RunResult

    session = {"session": "s", "windows": 3, "counts": {"vision": 3}, "dropped": {}, "missing": {}, "errors": {},
               "latency_p50_s": 0.01, "latency_p99_s": 0.02, "publisher_restarts": 1}
    result = RunResult([session], "tcp://127.0.0.1:5555", {"model": "m", "dim": 4, "device": "cpu", "dtype": "float32"},
                       1.0, publisher_stats={"dropped": {"emb/s/vision": 4, "ctl/s": 0}})
    out = io.StringIO()
    with redirect_stdout(out):
        _print_summary(result)
    text = out.getvalue()
    assert "publisher dropped (hwm): emb/s/vision 4" in text and "ctl/s" not in text
    assert "publisher restarted" in text


def test_one_encoder_call_carries_every_tower_and_a_refused_tower_spares_the_others():
    # Aligners send a release's items of every modality in one call (EncoderActor.encode_many);
    # a tower whose every item fails comes back as its error, and the other towers' rows still
    # come (an item failing beside good ones: tests/test_isolation.py).
    from pipeline.actors import EncoderActor

    enc = EncoderActor.remote({"config": "imagebind_tiny", "checkpoint": "none", "device": "cpu",
                               "precision": "fp32", "threads": 1}, 8, 5.0, prepare_ahead=True)
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8) for _ in range(3)]
    audio = [rng.standard_normal(32000).astype(np.float32)]
    out = ray.get(enc.encode_many.remote({"vision": clips, "audio": audio, "text": [7]}))
    assert set(out) == {"vision", "audio", "text"}
    assert isinstance(out["text"], str) and "expected str" in out["text"], out["text"]
    alone = ray.get(enc.encode_timed.remote("vision", clips)).rows
    rows, spans = out["vision"].rows, out["vision"].spans
    assert len(rows) == 3 and len(spans) == 3
    np.testing.assert_allclose(np.stack(rows), np.stack(alone), atol=1e-5)
    assert len(out["audio"].rows) == 1 and abs(float(np.linalg.norm(out["audio"].rows[0])) - 1.0) < 1e-5
    ray.kill(enc)


def test_a_release_comes_back_one_tower_at_a_time_with_the_rows_of_a_single_call():
    # Aligners call EncoderActor.encode_each, a Ray streaming generator: each tower's answer is
    # yielded as that tower finishes (so an aligner publishes it without waiting for slower
    # towers), with the rows encode_many gives; a refused tower comes as its error's text.
    from pipeline.actors import EncoderActor

    enc = EncoderActor.remote({"config": "imagebind_tiny", "checkpoint": "none", "device": "cpu",
                               "precision": "fp32", "threads": 1}, 8, 5.0, prepare_ahead=True)
    rng = np.random.default_rng(2)
    groups = {"vision": [rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8) for _ in range(3)],
              "imu": [np.concatenate([np.linspace(0, 5, 1000)[:, None], rng.standard_normal((1000, 6))], 1)],
              "text": [7]}
    answers = [ray.get(ref) for ref in enc.encode_each.remote(groups)]
    assert sorted(m for m, _ in answers) == sorted(groups)  # one answer per tower, each once
    got = dict(answers)
    assert isinstance(got["text"], str) and "expected str" in got["text"], got["text"]
    whole = ray.get(enc.encode_many.remote(groups))
    for m in ("vision", "imu"):
        np.testing.assert_array_equal(np.stack(got[m].rows), np.stack(whole[m].rows))
        assert len(got[m].spans) == len(groups[m])
    ray.kill(enc)


def test_preparing_ahead_gives_the_same_rows_as_preparing_in_the_model_thread():
    # encoders.prepare_ahead (default on a GPU): a second thread preprocesses the next batch
    # while the model runs; the rows must not depend on it, and each row's forward span covers
    # both stages.
    from pipeline.actors import EncoderActor

    opts = {"config": "imagebind_tiny", "checkpoint": "none", "device": "cpu", "precision": "fp32", "threads": 1}
    ahead = EncoderActor.remote(opts, 8, 0.0, prepare_ahead=True)
    inline = EncoderActor.remote(opts, 8, 0.0, prepare_ahead=False)
    rng = np.random.default_rng(1)
    groups = {
        "vision": [rng.integers(0, 256, (2, 224, 300, 3), dtype=np.uint8) for _ in range(2)],
        "depth": [rng.integers(300, 5000, (240, 320), dtype=np.uint16) for _ in range(3)],
        "imu": [np.concatenate([np.linspace(0, 5, 1000)[:, None], rng.standard_normal((1000, 6))], 1)],
        "text": ["a dog", "a cat"],
    }
    t0 = time.time()
    a, b = ray.get([ahead.encode_many.remote(groups), inline.encode_many.remote(groups)])
    for m, items in groups.items():
        rows_a, spans_a = a[m].rows, a[m].spans
        rows_b = b[m].rows
        assert len(rows_a) == len(items)
        np.testing.assert_array_equal(np.stack(rows_a), np.stack(rows_b))
        assert all(t0 <= s0 < s1 <= time.time() for s0, s1 in spans_a)
    stats = ray.get(ahead.stats.remote())
    assert stats["items"] == {m: len(v) for m, v in groups.items()}
    assert all(stats["forward_s"][m] > 0 for m in groups)
    ray.kill(ahead)
    ray.kill(inline)
