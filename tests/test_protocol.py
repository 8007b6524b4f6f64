"""Wire protocol v1: encoding, validation of hostile input, and the list-backed sink."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.protocol import (
    MAX_PAYLOAD_BYTES,
    VERSION,
    EmbeddingRecord,
    ProtocolError,
    ctl_topic,
    decode,
    emb_topic,
    embedding_array,
    encode_control,
    encode_embedding,
    unpackb_bounded,
)
from sinks import ListSink


def _unit(dim: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(dtype)


def _emb_frames(**over) -> list[bytes]:
    fields = dict(session="s1", stream="cam0", modality="vision", seq=0, window=3, t_start=1.0,
                  t_end=3.0, model="imagebind_huge", embedding=_unit(8), t_publish=1e9, latency_s=0.05)
    fields.update(over)
    return list(encode_embedding(**fields))


def _payload(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[1], raw=False)


def _repack(frames: list[bytes], **changes) -> list[bytes]:
    p = _payload(frames)
    for k, v in changes.items():
        if v is _DELETE:
            del p[k]
        else:
            p[k] = v
    return [frames[0], msgpack.packb(p, use_bin_type=True)]


_DELETE = object()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embedding_roundtrip_keeps_every_field_and_the_vector(dtype):
    vec = _unit(16, dtype)
    msg = decode(_emb_frames(embedding=vec, seq=7, window=-1))
    assert msg.topic == "emb/s1/vision" and msg.kind == "embedding"
    assert (msg.session, msg.modality, msg.seq, msg.event) == ("s1", "vision", 7, None)
    p = msg.payload
    assert p["v"] == VERSION and p["stream"] == "cam0" and p["window"] == -1
    assert p["dim"] == 16 and p["dtype"] == np.dtype(dtype).name
    out = embedding_array(msg)
    assert out.dtype == dtype and np.array_equal(out, vec)
    out[0] = 5.0  # the caller owns a writable copy


def test_embedding_bytes_are_little_endian_on_the_wire():
    vec = np.array([0.6, 0.8], dtype=">f4")  # big-endian input must not leak onto the wire
    p = _payload(_emb_frames(embedding=vec))
    assert struct.unpack("<2f", p["embedding"]) == pytest.approx((0.6, 0.8))


@pytest.mark.parametrize("event,fields", [
    ("start", {"streams": {"cam0": "vision", "mic": "audio"}, "model": "imagebind_huge", "dim": 1024}),
    ("heartbeat", {"counters": {"windows": 10, "queue": {"vision": 2}}}),
    ("end", {"counts": {"vision": 10}, "windows": 12, "dropped": {"late": 1}, "missing": {"audio": 2}}),
])
def test_control_roundtrip(event, fields):
    msg = decode(list(encode_control("s1", event, seq=4, **fields)))
    assert msg.topic == "ctl/s1" and msg.kind == "control" and msg.event == event and msg.seq == 4
    for k, v in fields.items():
        assert msg.payload[k] == v


def test_control_encoder_refuses_what_subscribers_would_reject():
    with pytest.raises(ValueError, match="'counts'"):
        encode_control("s1", "end", windows=1, dropped={})
    with pytest.raises(ValueError, match="unknown"):
        encode_control("s1", "pause")


def test_topics_reject_names_that_break_prefix_filtering():
    assert emb_topic("2024-05-01_kitchen", "audio") == "emb/2024-05-01_kitchen/audio"
    assert ctl_topic("s1") == "ctl/s1"
    for bad in ("a/b", "", " s", "s 1", "x" * 200):
        with pytest.raises(ValueError, match="session"):
            ctl_topic(bad)


@pytest.mark.parametrize("embedding,match", [
    (np.ones(4, np.float32), "norm"),
    (np.array([np.nan, 1, 0, 0], np.float32), "non-finite"),
    (_unit(4, np.float64), "dtype"),
    (_unit(4).reshape(2, 2), "shape"),
])
def test_encoder_refuses_embeddings_a_subscriber_could_not_trust(embedding, match):
    with pytest.raises(ValueError, match=match) as info:
        _emb_frames(embedding=embedding)
    assert "cam0" in str(info.value)  # the error names the stream


@pytest.mark.parametrize("mutate,match", [
    (lambda f: _repack(f, v=2), "version 2"),
    (lambda f: _repack(f, v=True), "version"),
    (lambda f: _repack(f, stream=_DELETE), "'stream' missing"),
    (lambda f: _repack(f, seq="0"), "'seq' must be int"),
    (lambda f: _repack(f, seq=-1), "seq"),
    (lambda f: _repack(f, dim=9), "expected dim 9"),
    (lambda f: _repack(f, embedding=b"\0" * 31), "31 bytes"),
    (lambda f: _repack(f, dtype="float64"), "dtype"),
    (lambda f: _repack(f, t_start=math.nan), "t_start"),
    (lambda f: _repack(f, modality="audio"), "does not match"),
    (lambda f: _repack(f, session="s2"), "does not match"),
    (lambda f: [b"emb/s1", f[1]], "emb/<session>/<modality>"),
    (lambda f: [b"other/s1", f[1]], "prefix"),
    (lambda f: [b"\xff\xfe", f[1]], "UTF-8"),
    (lambda f: [f[0]], "2 frames"),
    (lambda f: [f[0], f[1], b""], "2 frames"),
    (lambda f: [f[0], msgpack.packb([1, 2])], "map"),
    (lambda f: [f[0], f[1] + b"\x00"], "msgpack"),
    (lambda f: [f[0], f[1][:-3]], "msgpack"),
])
def test_malformed_embedding_messages_raise_protocol_error(mutate, match):
    with pytest.raises(ProtocolError, match=match):
        decode(mutate(_emb_frames()))


def test_extension_types_are_refused_even_timestamps():
    import datetime

    frames = _emb_frames()
    p = _payload(frames)
    p["extra"] = msgpack.ExtType(5, b"boom")
    with pytest.raises(ProtocolError, match="ext"):
        decode([frames[0], msgpack.packb(p, use_bin_type=True)])
    p["extra"] = datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(ProtocolError):
        decode([frames[0], msgpack.packb(p, use_bin_type=True, datetime=True)])


def test_huge_declared_sizes_are_refused_before_allocation():
    # bin32 / str32 / array32 / map32 headers claiming ~4 GiB with a few bytes behind them
    for header in (b"\xc6", b"\xdb", b"\xdd", b"\xdf"):
        with pytest.raises(ProtocolError):
            unpackb_bounded(header + b"\xff\xff\xff\xf0" + b"\x00" * 16)
    with pytest.raises(ProtocolError, match="over the limit"):
        unpackb_bounded(b"\x00" * (MAX_PAYLOAD_BYTES + 1))
    deep = b"\x91" * 100_000 + b"\x00"  # 100k nested arrays
    with pytest.raises(ProtocolError):
        unpackb_bounded(deep)


def test_unknown_extra_keys_are_kept_for_forward_compatibility():
    msg = decode(_repack(_emb_frames(), future_field=[1, 2]))
    assert msg.payload["future_field"] == [1, 2]


def test_control_messages_are_validated_per_event():
    good = list(encode_control("s1", "end", counts={"vision": 1}, windows=1, dropped={}))
    for change, match in [({"event": "pause"}, "unknown event"), ({"counts": {"vision": -1}}, "counts"),
                          ({"windows": "1"}, "windows"), ({"missing": ["audio"]}, "missing")]:
        with pytest.raises(ProtocolError, match=match):
            decode(_repack(good, **change))
    with pytest.raises(ProtocolError, match="streams"):
        decode(_repack(list(encode_control("s1", "start", streams={}, model="m", dim=4)), streams={"a": 1}))


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from([b"emb/s1/vision", b"ctl/s1"]) | st.binary(max_size=40),
       payload=st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_only_raises_protocol_error(topic, payload):
    try:
        decode([topic, payload])
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["v", "session", "stream", "modality", "seq", "window", "t_start", "t_end",
                            "model", "dim", "dtype", "embedding", "t_publish", "latency_s"]),
       value=_msgpack_values, event_payload=st.booleans())
def test_decode_of_mutated_valid_messages_only_raises_protocol_error(key, value, event_payload):
    base = (list(encode_control("s1", "end", counts={}, windows=0, dropped={})) if event_payload
            else _emb_frames())
    try:
        msg = decode(_repack(base, **{key: value}))
    except ProtocolError:
        return
    if msg.kind == "embedding":
        assert embedding_array(msg).size == msg.payload["dim"]


def test_list_sink_assigns_contiguous_seqs_per_topic_and_stamps_latency():
    clock = iter([100.0, 100.0, 101.0, 101.0, 102.0, 103.0]).__next__
    sink = ListSink(clock=clock)
    sink.start_session("s1", {"cam0": "vision", "mic": "audio"}, dim=8)
    recs = [EmbeddingRecord("s1", "cam0", "vision", w, w, w + 2.0, _unit(8), t_ingest=99.5) for w in range(3)]
    recs += [EmbeddingRecord("s1", "mic", "audio", w, w, w + 2.0, _unit(8, np.float16)) for w in range(2)]
    assert sink.publish(recs[:2] + recs[3:4]) == 3
    assert sink.publish(recs[2:3] + recs[4:]) == 2
    sink.end_session("s1", windows=3, dropped={"late": 1})
    seqs = {m.modality: [] for m in sink.embeddings()}
    for m in sink.embeddings():
        seqs[m.modality].append(m.seq)
    assert seqs == {"vision": [0, 1, 2], "audio": [0, 1]}
    assert sink.embeddings("vision")[0].payload["latency_s"] == pytest.approx(0.5)
    assert math.isnan(sink.embeddings("audio")[0].payload["latency_s"])  # ingest time unknown
    end = sink.messages[-1]
    assert (end.event, end.seq) == ("end", 1)
    assert end.payload["counts"] == {"vision": 3, "audio": 2} and end.payload["dropped"] == {"late": 1}


def test_sink_rejects_a_bad_batch_without_publishing_any_of_it():
    sink = ListSink()
    sink.start_session("s1", {"cam0": "vision"}, dim=8)
    good = EmbeddingRecord("s1", "cam0", "vision", 0, 0.0, 1.0, _unit(8))
    with pytest.raises(ValueError, match="expected dim 8"):
        sink.publish([good, EmbeddingRecord("s1", "cam0", "vision", 1, 0.0, 1.0, _unit(4))])
    with pytest.raises(ValueError, match="announced as 'vision'"):
        sink.publish([EmbeddingRecord("s1", "cam0", "audio", 1, 0.0, 1.0, _unit(8))])
    with pytest.raises(ValueError, match="not started"):
        sink.publish([EmbeddingRecord("s9", "cam0", "vision", 0, 0.0, 1.0, _unit(8))])
    sink.publish([good])
    assert [m.seq for m in sink.embeddings()] == [0]  # the failed batches used no seq


def test_resumed_sink_continues_numbering_and_never_reuses_a_seq():
    first = ListSink()
    first.start_session("s1", {"cam0": "vision"}, dim=8)
    first.publish([EmbeddingRecord("s1", "cam0", "vision", w, 0.0, 1.0, _unit(8)) for w in range(3)])
    second = ListSink(resume_seqs=first.stats()["next_seq"])
    second.start_session("s1", {"cam0": "vision"}, dim=8)
    second.publish([EmbeddingRecord("s1", "cam0", "vision", 3, 0.0, 1.0, _unit(8))])
    assert [m.seq for m in second.messages] == [1, 3]  # start on ctl/s1, then emb seq 3


def test_maybe_heartbeat_sends_only_when_the_last_control_message_is_old_enough():
    now = [0.0]
    sink = ListSink(clock=lambda: now[0])
    sink.start_session("s1", {"cam0": "vision"}, dim=8)
    now[0] = 1.0
    assert not sink.maybe_heartbeat("s1", {"windows": 0}, every_s=2.0)
    now[0] = 2.5
    assert sink.maybe_heartbeat("s1", {"windows": 1}, every_s=2.0, missing={"audio": 1})
    assert not sink.maybe_heartbeat("s1", every_s=2.0)
    hb = sink.messages[-1]
    assert hb.event == "heartbeat" and hb.payload["counters"] == {"windows": 1}
    assert hb.payload["missing"] == {"audio": 1} and hb.payload["t_publish"] == 2.5


def test_numpy_counters_are_encoded_as_plain_numbers():
    sink = ListSink()
    sink.start_session("s1", {"cam0": "vision"}, dim=np.int64(8))
    sink.end_session("s1", counts={"vision": np.int64(0)}, windows=np.int32(4), dropped={"late": np.uint8(1)})
    end = sink.messages[-1].payload
    assert end["counts"] == {"vision": 0} and end["windows"] == 4 and end["dropped"] == {"late": 1}
