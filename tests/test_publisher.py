"""The ZeroMQ publisher and subscriber over real sockets on 127.0.0.1 (and ipc://)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
import zmq

from sinks.keys import CurveClientConfig, CurveServerConfig, add_keys_args, generate_keys
from sinks.protocol import EmbeddingRecord, Message, decode, embedding_array, encode_embedding
from pipeline.subscribe import add_subscribe_args, subscribe
from sinks import Publisher

_ANY_PORT = "tcp://127.0.0.1:*"


def _unit(dim: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(dtype)


def _records(modality: str, stream: str, n: int, dim: int = 8, start: int = 0) -> list[EmbeddingRecord]:
    return [EmbeddingRecord("s1", stream, modality, w, float(w), w + 2.0, _unit(dim, w), time.time())
            for w in range(start, start + n)]


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _sub(ctx: zmq.Context, endpoint: str, *, topic: bytes = b"", curve: CurveClientConfig | None = None,
         rcvhwm: int | None = None, rcvbuf: int | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    if rcvhwm is not None:
        sock.rcvhwm = rcvhwm
    if rcvbuf is not None:
        sock.setsockopt(zmq.RCVBUF, rcvbuf)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def _receive_until_end(sock: zmq.Socket, timeout_s: float = 10.0, delay_s: float = 0.0) -> list[Message]:
    """Everything up to and including the session's ``end`` message."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        msg = decode(sock.recv_multipart())
        out.append(msg)
        if msg.event == "end":
            return out
        if delay_s:
            time.sleep(delay_s)
    raise AssertionError(f"no end message within {timeout_s} s; got {len(out)} messages")


def _seqs(messages: list[Message]) -> dict[str, list[int]]:
    by_topic: dict[str, list[int]] = {}
    for m in messages:
        by_topic.setdefault(m.topic, []).append(m.seq)
    return by_topic


def test_subscriber_receives_a_whole_session_in_order_with_contiguous_seqs(ctx):
    with Publisher(_ANY_PORT, wait_for_subscribers=1, wait_timeout_s=10) as pub:
        assert pub.bound_endpoint.startswith("tcp://127.0.0.1:") and not pub.bound_endpoint.endswith("*")
        sub = _sub(ctx, pub.bound_endpoint)
        pub.start_session("s1", {"cam0": "vision", "mic": "audio"}, dim=8)
        vision, audio = _records("vision", "cam0", 5), _records("audio", "mic", 3)
        pub.publish(vision[:2] + audio[:1])
        pub.publish(vision[2:] + audio[1:])
        pub.heartbeat("s1", {"windows": 5})
        pub.end_session("s1", windows=5, dropped={"late": 2})
        got = _receive_until_end(sub)
    assert [m.event for m in got if m.kind == "control"] == ["start", "heartbeat", "end"]
    assert _seqs(got) == {"ctl/s1": [0, 1, 2], "emb/s1/vision": [0, 1, 2, 3, 4], "emb/s1/audio": [0, 1, 2]}
    first = next(m for m in got if m.kind == "embedding")
    assert np.array_equal(embedding_array(first), vision[0].embedding)
    assert first.payload["latency_s"] >= 0 and first.payload["model"] == "imagebind_huge"
    end = got[-1].payload
    assert end["counts"] == {"vision": 5, "audio": 3} and end["windows"] == 5 and end["dropped"] == {"late": 2}


def test_ipc_endpoint_delivers(ctx):
    tmp = tempfile.mkdtemp(prefix="bs", dir="/tmp")  # ipc paths must stay short (~100 bytes)
    try:
        with Publisher(f"ipc://{tmp}/pub.sock", wait_for_subscribers=1, wait_timeout_s=10) as pub:
            sub = _sub(ctx, pub.bound_endpoint, topic=b"emb/s1/")
            pub.start_session("s1", {"cam0": "vision"}, dim=8)
            pub.publish(_records("vision", "cam0", 2))
            got = [decode(sub.recv_multipart()) for _ in range(2)]
        assert [(m.topic, m.seq) for m in got] == [("emb/s1/vision", 0), ("emb/s1/vision", 1)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_wait_for_subscribers_waits_for_the_nth_and_then_nobody_misses_the_start(ctx):
    with Publisher(_ANY_PORT, wait_for_subscribers=2, wait_timeout_s=10) as pub:
        first = _sub(ctx, pub.bound_endpoint)
        with pytest.raises(TimeoutError, match="1 of 2"):
            pub.wait_for_subscribers(timeout_s=0.5)
        second = _sub(ctx, pub.bound_endpoint, topic=b"ctl/")
        pub.start_session("s1", {"cam0": "vision"}, dim=8)  # blocks until the second subscribed
        assert pub.stats()["subscriptions"] == 2
        for sock in (first, second):
            assert sock.poll(5000), "a waited-for subscriber missed the start message"
            assert decode(sock.recv_multipart()).event == "start"


def test_replay_mode_with_a_slow_subscriber_loses_nothing(ctx):
    n = 300
    with Publisher(_ANY_PORT, mode="replay", hwm=10, wait_for_subscribers=1, wait_timeout_s=10) as pub:
        sub = _sub(ctx, pub.bound_endpoint, rcvhwm=10, rcvbuf=4096)
        pub.start_session("s1", {"cam0": "vision"}, dim=256)
        received: list[Message] = []
        reader = threading.Thread(target=lambda: received.extend(_receive_until_end(sub, 30, delay_s=0.002)))
        reader.start()
        for rec in _records("vision", "cam0", n, dim=256):
            pub.publish([rec])
        pub.end_session("s1", windows=n)
        reader.join(35)
        assert pub.stats()["dropped"] == {}
    assert _seqs(received)["emb/s1/vision"] == list(range(n))
    assert received[-1].payload["counts"] == {"vision": n}


def test_live_mode_never_blocks_on_a_stalled_subscriber_and_counts_hwm_drops(ctx):
    n, dim = 3000, 1024
    with Publisher(_ANY_PORT, mode="live", hwm=10, wait_for_subscribers=1, wait_timeout_s=10) as pub:
        stalled = _sub(ctx, pub.bound_endpoint, rcvhwm=10, rcvbuf=4096)
        pub.start_session("s1", {"cam0": "vision"}, dim=dim)
        records = _records("vision", "cam0", n, dim=dim)
        sent: list[int] = []
        worker = threading.Thread(target=lambda: sent.extend(pub.publish([r]) for r in records))
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "live publish blocked on a stalled subscriber"
        dropped = pub.stats()["dropped"]["emb/s1/vision"]
        assert dropped > 0 and sum(sent) + dropped == n
        # The subscriber wakes up: it gets what it had room for, and sees the gaps in seq.
        got = []
        while stalled.poll(1000):
            got.append(decode(stalled.recv_multipart()))
        emb = [m.seq for m in got if m.kind == "embedding"]
        # At most what was sent: after its first counted drop libzmq skips the full subscriber
        # (without telling the publisher) until it reads again; the seq gap still shows the loss.
        assert 0 < len(emb) <= sum(sent) and emb == sorted(emb)
        # Dropped messages used their seq: whether the drops fell between received messages or
        # all after them, the next embedding that gets through shows the loss as a gap.
        assert pub.publish(_records("vision", "cam0", 1, dim=dim, start=n)) == 1
        assert stalled.poll(5000)
        nxt = decode(stalled.recv_multipart())
        assert nxt.seq == n > (emb[-1] if emb else -1) + 1  # the subscriber can see it lost messages
        pub.end_session("s1", windows=n + 1)
        assert stalled.poll(5000)
        end = decode(stalled.recv_multipart())
        assert end.event == "end" and end.payload["dropped"] == {"hwm": dropped}


def test_curve_only_the_allowed_subscriber_receives(ctx, tmp_path):
    generate_keys(tmp_path / "keys", ["alice"])
    generate_keys(tmp_path / "other", ["mallory"])  # a key pair the publisher never allowed
    keys = tmp_path / "keys"
    server = CurveServerConfig.from_files(keys / "server.key_secret", keys / "authorized_clients")
    assert server.secret_key.decode() not in repr(server)  # the secret never lands in logs
    with Publisher(_ANY_PORT, curve=server) as pub:
        alice = _sub(ctx, pub.bound_endpoint, curve=CurveClientConfig.from_files(keys / "server.key", keys / "alice.key_secret"))
        mallory = _sub(ctx, pub.bound_endpoint,
                       curve=CurveClientConfig.from_files(keys / "server.key", tmp_path / "other" / "mallory.key_secret"))
        plain = _sub(ctx, pub.bound_endpoint)
        pub.wait_for_subscribers(1, timeout_s=10)
        with pytest.raises(TimeoutError):
            pub.wait_for_subscribers(2, timeout_s=0.5)  # neither intruder ever gets to subscribe
        pub.start_session("s1", {"cam0": "vision"}, dim=8)
        pub.publish(_records("vision", "cam0", 3))
        pub.end_session("s1", windows=3)
        got = _receive_until_end(alice)
        assert [m.seq for m in got if m.kind == "embedding"] == [0, 1, 2]
        assert not mallory.poll(300) and not plain.poll(10)


def test_subscribe_cli_prints_json_lines_with_the_embedding(capsys):
    parser = argparse.ArgumentParser()
    sub_parsers = parser.add_subparsers()
    add_subscribe_args(sub_parsers)
    with Publisher(_ANY_PORT, wait_for_subscribers=1, wait_timeout_s=10) as pub:
        args = parser.parse_args(["subscribe", pub.bound_endpoint, "--json", "--topic", "emb/s1/",
                                  "--count", "2", "--timeout", "10"])
        codes: list[int] = []
        cli = threading.Thread(target=lambda: codes.append(args.fn(args)))
        cli.start()
        pub.start_session("s1", {"cam0": "vision"}, dim=8)
        records = _records("vision", "cam0", 2)
        pub.publish(records)
        cli.join(15)
    assert codes == [0]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["topic"], d["seq"], d["window"]) for d in lines] == [("emb/s1/vision", 0, 0), ("emb/s1/vision", 1, 1)]
    assert np.allclose(lines[1]["embedding"], records[1].embedding)


def test_subscriber_warns_on_seq_gaps_and_skips_malformed_messages(ctx, caplog):
    pub = ctx.socket(zmq.XPUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    out: list[str] = []

    class _Out:
        def write(self, s: str) -> None:
            out.append(s)

        def flush(self) -> None:
            pass

    def frames(seq: int) -> list[bytes]:
        return list(encode_embedding(session="s1", stream="cam0", modality="vision", seq=seq, window=seq,
                                     t_start=0.0, t_end=1.0, model="m", embedding=_unit(8), t_publish=0.0,
                                     latency_s=0.0))

    reader = threading.Thread(target=subscribe, args=(f"tcp://127.0.0.1:{port}",),
                              kwargs=dict(count=3, timeout_s=10, out=_Out()))
    with caplog.at_level(logging.WARNING, logger="pipeline.subscribe"):
        reader.start()
        assert pub.poll(10000) and pub.recv() == b"\x01"  # the subscriber's subscription
        pub.send_multipart(frames(0))
        pub.send_multipart([b"emb/s1/vision", b"\xc1garbage"])
        pub.send_multipart(frames(3))
        pub.send_multipart(frames(4))
        reader.join(15)
    assert [line.split()[1] for line in out] == ["seq=0", "seq=3", "seq=4"]
    assert "2 message(s) missed" in caplog.text and "malformed" in caplog.text


def test_keys_cli_writes_usable_keys_and_refuses_to_overwrite(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_keys_args(parser.add_subparsers())
    args = parser.parse_args(["keys", str(tmp_path / "k"), "--client", "cam-viewer"])
    assert args.fn(args) == 0
    assert (tmp_path / "k" / "authorized_clients" / "cam-viewer.key").is_file()
    CurveServerConfig.from_files(tmp_path / "k" / "server.key_secret", tmp_path / "k" / "authorized_clients")
    CurveClientConfig.from_files(tmp_path / "k" / "server.key", tmp_path / "k" / "cam-viewer.key_secret")
    assert args.fn(args) == 2 and "--force" in capsys.readouterr().err


def test_a_second_publisher_on_a_taken_endpoint_fails_with_the_endpoint_named():
    with Publisher(_ANY_PORT) as pub:
        with pytest.raises(OSError, match=pub.bound_endpoint):
            Publisher(pub.bound_endpoint)
    with pytest.raises(ValueError, match="mode 'fast'"):
        Publisher(_ANY_PORT, mode="fast")


@pytest.mark.parametrize("mode", ["replay", "live"])
def test_a_late_subscriber_gets_the_sessions_start_repeated_without_moving_anyones_seqs(ctx, mode):
    from pipeline.subscribe import _GapTracker

    pub = Publisher(_ANY_PORT, mode=mode, wait_for_subscribers=1, wait_timeout_s=10)
    early = _sub(ctx, pub.bound_endpoint)
    pub.start_session("s1", {"cam": "vision"}, model="m", dim=8)
    pub.publish(_records("vision", "cam", 3))
    late = _sub(ctx, pub.bound_endpoint, topic=b"ctl/")
    deadline = time.monotonic() + 10
    while pub.subscriptions < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pub.publish(_records("vision", "cam", 2, start=3))
    pub.heartbeat("s1", {"windows": 5})
    pub.end_session("s1", windows=5)
    late_msgs = _receive_until_end(late)
    early_msgs = _receive_until_end(early)
    pub.close()

    hello = late_msgs[0]
    assert hello.topic == "ctl/s1" and hello.payload["event"] == "start" and hello.payload["repeat"] is True
    assert "seq" not in hello.payload
    assert (hello.payload["streams"], hello.payload["model"], hello.payload["dim"]) == ({"cam": "vision"}, "m", 8)
    assert [m.payload["event"] for m in late_msgs[1:]] == ["heartbeat", "end"]
    # The subscriber that was there from the start: seqs contiguous on every topic, no gap seen
    # by the subscribe command's tracker; the copy reaches it too, marked, after its real start.
    gaps = _GapTracker()
    for m in early_msgs:
        assert gaps.see(m.topic, m.seq) == 0
    assert [m.seq for m in early_msgs if m.topic == "emb/s1/vision"] == [0, 1, 2, 3, 4]
    ctl = [(m.payload["event"], m.seq, m.payload.get("repeat")) for m in early_msgs if m.topic == "ctl/s1"]
    assert ctl == [("start", 0, None), ("start", None, True), ("heartbeat", 1, None), ("end", 2, None)]
    assert gaps.missed == {}


def test_no_repeated_start_for_subscribers_that_came_before_it_or_for_an_ended_session(ctx):
    pub = Publisher(_ANY_PORT, wait_for_subscribers=1, wait_timeout_s=10)
    sub = _sub(ctx, pub.bound_endpoint)
    pub.start_session("s1", {"cam": "vision"}, model="m", dim=8)
    pub.publish(_records("vision", "cam", 1))
    pub.end_session("s1", windows=1)
    late = _sub(ctx, pub.bound_endpoint)
    deadline = time.monotonic() + 10
    while pub.subscriptions < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pub.start_session("s2", {"cam": "vision"}, model="m", dim=8)
    pub.end_session("s2", windows=0)
    msgs = _receive_until_end(sub) + _receive_until_end(sub)
    late_msgs = _receive_until_end(late)
    pub.close()
    assert [(m.topic, m.payload["event"]) for m in msgs if m.topic.startswith("ctl/")] == [
        ("ctl/s1", "start"), ("ctl/s1", "end"), ("ctl/s2", "start"), ("ctl/s2", "end")]
    assert [(m.topic, m.payload["event"], m.seq) for m in late_msgs] == [("ctl/s2", "start", 0), ("ctl/s2", "end", 1)]
    assert not any(m.payload.get("repeat") for m in msgs + late_msgs)
