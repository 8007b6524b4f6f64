"""Wire protocol v1: what bindstream publishes over ZeroMQ, and how to read it back safely.

Every message is two ZeroMQ frames, ``[topic, payload]``: the topic is UTF-8 text used for
ZeroMQ prefix filtering, the payload a msgpack map with string keys (binary data as msgpack
``bin``). ``docs/protocol.md`` is the full specification for subscribers in any language; this
module is the reference encoder and a validating decoder.

Topics:

* ``emb/<session>/<modality>``: one embedding of one window of one modality.
* ``ctl/<session>``: session control, ``event`` is ``start``, ``heartbeat`` or ``end``.
* ``evt/<session>/<trigger>``: a trigger's event, ``event`` is ``start`` or ``end`` (additive in v1).

``seq`` counts messages per topic (0, 1, 2, ...), so a subscriber detects what it missed from a
gap. Nothing here imports ZeroMQ: encoding and decoding are pure functions over bytes, which
keeps them testable and reusable by other transports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np


__all__ = [
    "VERSION",
    "DEFAULT_ENDPOINT",
    "DEFAULT_MODEL",
    "MAX_PAYLOAD_BYTES",
    "MAX_TOPIC_BYTES",
    "EMBEDDING_DTYPES",
    "CONTROL_EVENTS",
    "TRIGGER_EVENTS",
    "ProtocolError",
    "EmbeddingRecord",
    "Message",
    "emb_topic",
    "ctl_topic",
    "evt_topic",
    "encode_embedding",
    "encode_control",
    "encode_event",
    "decode",
    "embedding_array",
    "unpackb_bounded",
]

VERSION = 1
# Loopback by default: exposing embeddings on a network interface must be a deliberate choice
# (and should come with CurveZMQ, see docs/protocol.md).
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_MODEL = "imagebind_huge"

# The modality segment of a topic: ImageBind's six modalities, in the order the sources list
# them (tests/test_lint.py checks the two tuples are equal).
MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")

# A 1024-d float32 embedding is ~4.3 KiB on the wire; 1 MiB leaves room for any plausible
# model while bounding what a hostile peer can make a subscriber allocate.
MAX_PAYLOAD_BYTES = 1 << 20
MAX_TOPIC_BYTES = 512
_MAX_STR = 4096
_MAX_CONTAINER = 4096

EMBEDDING_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}
CONTROL_EVENTS = ("start", "heartbeat", "end")
TRIGGER_EVENTS = ("start", "end")

# Session and modality names become topic segments; '/' would break topic parsing and
# whitespace/control characters make prefix subscriptions error-prone.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}")
# L2 norm tolerance: float16 storage alone costs ~1e-3; anything further off is an encoder bug.
_NORM_TOL = 1e-2

_RESERVED_CONTROL_KEYS = frozenset({"v", "session", "event"})


class ProtocolError(ValueError):
    """A message does not follow wire protocol v1 (malformed, hostile or another version)."""


@dataclass(frozen=True)
class EmbeddingRecord:
    """One embedding to publish, as the encoder stage hands it to a sink.

    ``t_start``/``t_end`` are session-clock seconds of the data the window used; ``t_ingest`` is
    the wall-clock time (``time.time()``) at which the window's last sample entered the
    pipeline (0 = unknown, published latency is then NaN).
    """

    session: str
    stream: str
    modality: str
    window: int
    t_start: float
    t_end: float
    embedding: np.ndarray  # float32 or float16, 1-D, L2 norm 1
    t_ingest: float = 0.0


@dataclass(frozen=True)
class Message:
    """A decoded, validated message: its topic and its payload map."""

    topic: str
    payload: dict[str, Any]

    @property
    def kind(self) -> str:
        """``"embedding"``, ``"control"`` or ``"trigger"`` (an event of a trigger)."""
        return {"emb/": "embedding", "evt/": "trigger"}.get(self.topic[:4], "control")

    @property
    def session(self) -> str:
        return self.payload["session"]

    @property
    def seq(self) -> int | None:
        """Per-topic sequence number (always set on embeddings; control messages from
        bindstream carry it too)."""
        return self.payload.get("seq")

    @property
    def modality(self) -> str | None:
        return self.payload.get("modality") if self.kind != "control" else None

    @property
    def event(self) -> str | None:
        return self.payload.get("event") if self.kind != "embedding" else None


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid topic segment: expected 1-128 characters of "
            f"[A-Za-z0-9_.:+-], not starting with punctuation"
        )
    return value


def emb_topic(session: str, modality: str) -> str:
    """Topic of the embeddings of one modality of one session: ``emb/<session>/<modality>``."""
    return f"emb/{_check_name('session', session)}/{_check_name('modality', modality)}"


def ctl_topic(session: str) -> str:
    """Topic of the control messages of one session: ``ctl/<session>``."""
    return f"ctl/{_check_name('session', session)}"


def evt_topic(session: str, trigger: str) -> str:
    """Topic of the events of one trigger in one session: ``evt/<session>/<trigger>``."""
    return f"evt/{_check_name('session', session)}/{_check_name('trigger', trigger)}"


def _plain(value: Any) -> Any:
    # Counters often arrive as numpy scalars; msgpack only knows Python types.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} in a protocol message")


def _pack(payload: dict[str, Any]) -> bytes:
    try:
        data = msgpack.packb(payload, use_bin_type=True, default=_plain)
    except TypeError as exc:
        raise ValueError(f"message for session {payload.get('session')!r}: {exc}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"message for session {payload.get('session')!r} is {len(data)} bytes, over the "
            f"protocol limit of {MAX_PAYLOAD_BYTES} bytes that subscribers accept"
        )
    return data


def _embedding_bytes(embedding: np.ndarray, where: str) -> tuple[str, bytes]:
    arr = np.asarray(embedding)
    name = {4: "float32", 2: "float16"}.get(arr.dtype.itemsize) if arr.dtype.kind == "f" else None
    if name is None:
        raise ValueError(f"{where}: embedding dtype {arr.dtype} unsupported, expected float32 or float16")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{where}: embedding shape {arr.shape} unsupported, expected a non-empty 1-D vector")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: embedding has non-finite values")
    norm = float(np.linalg.norm(arr.astype(np.float64)))
    if abs(norm - 1.0) > _NORM_TOL:
        raise ValueError(f"{where}: embedding L2 norm is {norm:.4f}, expected 1 (normalize before publishing)")
    # Wire order is little endian whatever the host is.
    return name, arr.astype(EMBEDDING_DTYPES[name], copy=False).tobytes()


def encode_embedding(
    *,
    session: str,
    stream: str,
    modality: str,
    seq: int,
    window: int,
    t_start: float,
    t_end: float,
    model: str,
    embedding: np.ndarray,
    t_publish: float,
    latency_s: float,
) -> tuple[bytes, bytes]:
    """Encode one embedding message; returns ``(topic, payload)`` frames.

    Raises ``ValueError`` naming the stream when the embedding is not a finite, unit-norm,
    1-D float32/float16 vector or a field is out of range.
    """
    where = f"stream {stream!r} ({modality}, window {window})"
    if modality not in MODALITIES:
        raise ValueError(f"{where}: modality {modality!r} unknown, expected one of {MODALITIES}")
    topic = emb_topic(session, modality)
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"session {session!r}: stream name must be a non-empty string, got {stream!r}")
    _require_int(seq, f"{where}: seq", minimum=0)
    _require_int(window, f"{where}: window")
    if not (math.isfinite(t_start) and math.isfinite(t_end) and t_start <= t_end):
        raise ValueError(f"{where}: expected finite t_start <= t_end, got {t_start}, {t_end}")
    dtype, data = _embedding_bytes(embedding, where)
    payload = {
        "v": VERSION,
        "session": session,
        "stream": stream,
        "modality": modality,
        "seq": int(seq),
        "window": int(window),
        "t_start": float(t_start),
        "t_end": float(t_end),
        "model": str(model),
        "dim": int(np.asarray(embedding).size),
        "dtype": dtype,
        "embedding": data,
        "t_publish": float(t_publish),
        "latency_s": float(latency_s),
    }
    return topic.encode(), _pack(payload)


def encode_control(session: str, event: str, **fields: Any) -> tuple[bytes, bytes]:
    """Encode one control message on ``ctl/<session>``; returns ``(topic, payload)`` frames.

    ``fields`` are the event's fields (``start``: streams, model, dim; ``heartbeat``: counters;
    ``end``: counts, windows, dropped; optional everywhere: seq, t_publish, missing, and any
    extra key, which v1 subscribers ignore). The result is validated with :func:`decode`, so
    nothing this returns is rejected by a bindstream subscriber.
    """
    if event not in CONTROL_EVENTS:
        raise ValueError(f"session {session!r}: control event {event!r} unknown, expected one of {CONTROL_EVENTS}")
    topic = ctl_topic(session)
    clash = _RESERVED_CONTROL_KEYS.intersection(fields)
    if clash:
        raise ValueError(f"session {session!r}: control fields {sorted(clash)} are set by the protocol")
    payload = {"v": VERSION, "session": session, "event": event, **fields}
    frames = (topic.encode(), _pack(payload))
    try:
        decode(list(frames))
    except ProtocolError as exc:
        raise ValueError(f"session {session!r}: invalid {event!r} control message: {exc}") from None
    return frames


def encode_event(*, session: str, trigger: str, event: str, seq: int, stream: str, modality: str, window: int,
                 t_start: float, t_end: float, score: float, t_publish: float, **extra: Any) -> tuple[bytes, bytes]:
    """Encode one trigger event on ``evt/<session>/<trigger>``; returns ``(topic, payload)`` frames.

    ``event`` is ``start`` or ``end``; ``t_start``/``t_end`` are session-clock seconds of the
    event so far (``end``: all of it); ``score`` the peak score. ``extra`` (e.g. ``reason`` on
    ``end``) are optional keys. Validated with :func:`decode` like control messages."""
    topic = evt_topic(session, trigger)
    payload = {"v": VERSION, "session": session, "trigger": trigger, "event": event, "seq": int(seq),
               "stream": stream, "modality": modality, "window": int(window), "t_start": float(t_start),
               "t_end": float(t_end), "score": float(score), "t_publish": float(t_publish), **extra}
    frames = (topic.encode(), _pack(payload))
    try:
        decode(list(frames))
    except ProtocolError as exc:
        raise ValueError(f"session {session!r} trigger {trigger!r}: invalid {event!r} event: {exc}") from None
    return frames


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def unpackb_bounded(
    data: bytes,
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    max_str_len: int = _MAX_STR,
    max_container_len: int = _MAX_CONTAINER,
) -> Any:
    """Unpack msgpack from an untrusted peer with every size bounded.

    Declared lengths are checked before anything is allocated, extension types (timestamps
    included) are refused, map keys must be strings or bytes, and any failure is a
    :class:`ProtocolError`. Reuse this for every msgpack input that comes off a socket.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes to unpack, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"payload is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_str_len,
            max_array_len=max_container_len,
            max_map_len=max_container_len,
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, ...) on hostile input
        raise ProtocolError(f"payload is not valid bounded msgpack: {type(exc).__name__}: {exc}") from None


def _require_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    # bool is an int subclass; a True seq is a bug, not a 1.
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _field(payload: dict, key: str, types: tuple[type, ...], where: str) -> Any:
    if key not in payload:
        raise ProtocolError(f"{where}: required key {key!r} missing")
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, types):
        expected = "/".join(t.__name__ for t in types)
        raise ProtocolError(f"{where}: key {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _count_map(payload: dict, key: str, where: str, *, required: bool) -> None:
    if key not in payload and not required:
        return
    value = _field(payload, key, (dict,), where)
    for name, count in value.items():
        if not isinstance(name, str) or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ProtocolError(f"{where}: {key!r} must map names to counts >= 0, got {name!r}: {count!r}")


def _validate_embedding(topic: str, payload: dict) -> None:
    parts = topic.split("/")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ProtocolError(f"topic {topic!r}: expected emb/<session>/<modality>")
    where = f"topic {topic!r}"
    for key in ("stream", "model"):
        _field(payload, key, (str,), where)
    modality = _field(payload, "modality", (str,), where)
    if modality != parts[2]:
        raise ProtocolError(f"{where}: payload modality {modality!r} does not match the topic")
    seq = _field(payload, "seq", (int,), where)
    if seq < 0:
        raise ProtocolError(f"{where}: seq must be >= 0, got {seq}")
    _field(payload, "window", (int,), where)
    t_start = _field(payload, "t_start", (float, int), where)
    t_end = _field(payload, "t_end", (float, int), where)
    if not (math.isfinite(t_start) and math.isfinite(t_end) and t_start <= t_end):
        raise ProtocolError(f"{where}: expected finite t_start <= t_end, got {t_start}, {t_end}")
    _field(payload, "t_publish", (float, int), where)
    _field(payload, "latency_s", (float, int), where)  # NaN allowed: ingest time unknown
    dim = _field(payload, "dim", (int,), where)
    dtype = _field(payload, "dtype", (str,), where)
    if dtype not in EMBEDDING_DTYPES:
        raise ProtocolError(f"{where}: dtype {dtype!r} unsupported, expected one of {sorted(EMBEDDING_DTYPES)}")
    data = _field(payload, "embedding", (bytes,), where)
    if dim <= 0 or len(data) != dim * EMBEDDING_DTYPES[dtype].itemsize:
        raise ProtocolError(
            f"{where}: embedding is {len(data)} bytes, expected dim {dim} x "
            f"{EMBEDDING_DTYPES[dtype].itemsize} bytes ({dtype})"
        )


def _validate_control(topic: str, payload: dict) -> None:
    parts = topic.split("/")
    if len(parts) != 2 or not parts[1]:
        raise ProtocolError(f"topic {topic!r}: expected ctl/<session>")
    where = f"topic {topic!r}"
    event = _field(payload, "event", (str,), where)
    where = f"topic {topic!r} event {event!r}"
    if event not in CONTROL_EVENTS:
        raise ProtocolError(f"{where}: unknown event, expected one of {CONTROL_EVENTS}")
    if "seq" in payload:
        seq = _field(payload, "seq", (int,), where)
        if seq < 0:
            raise ProtocolError(f"{where}: seq must be >= 0, got {seq}")
    if "t_publish" in payload:
        _field(payload, "t_publish", (float, int), where)
    if event == "start":
        streams = _field(payload, "streams", (dict,), where)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in streams.items()):
            raise ProtocolError(f"{where}: 'streams' must map stream name -> modality (strings)")
        _field(payload, "model", (str,), where)
        if _field(payload, "dim", (int,), where) <= 0:
            raise ProtocolError(f"{where}: dim must be > 0")
    elif event == "heartbeat":
        _field(payload, "counters", (dict,), where)
    else:
        _count_map(payload, "counts", where, required=True)
        if _field(payload, "windows", (int,), where) < 0:
            raise ProtocolError(f"{where}: windows must be >= 0")
        _count_map(payload, "dropped", where, required=True)
    _count_map(payload, "missing", where, required=False)


def _validate_trigger(topic: str, payload: dict) -> None:
    parts = topic.split("/")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ProtocolError(f"topic {topic!r}: expected evt/<session>/<trigger>")
    where = f"topic {topic!r}"
    if _field(payload, "trigger", (str,), where) != parts[2]:
        raise ProtocolError(f"{where}: payload trigger {payload['trigger']!r} does not match the topic")
    if _field(payload, "event", (str,), where) not in TRIGGER_EVENTS:
        raise ProtocolError(f"{where}: unknown event {payload['event']!r}, expected one of {TRIGGER_EVENTS}")
    if _field(payload, "seq", (int,), where) < 0:
        raise ProtocolError(f"{where}: seq must be >= 0, got {payload['seq']}")
    for key in ("stream", "modality"):
        _field(payload, key, (str,), where)
    _field(payload, "window", (int,), where)
    t_start, t_end = (_field(payload, k, (float, int), where) for k in ("t_start", "t_end"))
    if not (math.isfinite(t_start) and math.isfinite(t_end) and t_start <= t_end):
        raise ProtocolError(f"{where}: expected finite t_start <= t_end, got {t_start}, {t_end}")
    if not math.isfinite(_field(payload, "score", (float, int), where)):
        raise ProtocolError(f"{where}: score must be finite")
    _field(payload, "t_publish", (float, int), where)


def decode(frames: Sequence[bytes]) -> Message:
    """Decode and validate one received message (the list of its frames).

    Checks the frame count, topic, protocol version, required keys and their types, that the
    payload agrees with its topic, and that the embedding holds exactly ``dim`` values. Unknown
    extra keys are kept (forward compatible). Anything else raises :class:`ProtocolError`.
    """
    if not isinstance(frames, (list, tuple)) or len(frames) != 2:
        count = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise ProtocolError(f"expected 2 frames [topic, payload], got {count}")
    raw_topic, raw_payload = (bytes(f) if isinstance(f, (bytearray, memoryview)) else f for f in frames)
    if not isinstance(raw_topic, bytes) or len(raw_topic) > MAX_TOPIC_BYTES:
        raise ProtocolError(f"topic frame must be at most {MAX_TOPIC_BYTES} bytes")
    try:
        topic = raw_topic.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"topic {raw_topic[:64]!r} is not UTF-8") from None
    if not topic.startswith(("emb/", "ctl/", "evt/")):
        raise ProtocolError(f"topic {topic!r}: expected prefix 'emb/', 'ctl/' or 'evt/'")
    payload = unpackb_bounded(raw_payload)
    if not isinstance(payload, dict):
        raise ProtocolError(f"topic {topic!r}: payload must be a msgpack map, got {type(payload).__name__}")
    version = payload.get("v")
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(f"topic {topic!r}: protocol version {version!r} unsupported, expected {VERSION}")
    session = _field(payload, "session", (str,), f"topic {topic!r}")
    if topic.split("/")[1:2] != [session]:
        raise ProtocolError(f"topic {topic!r}: payload session {session!r} does not match the topic")
    if topic.startswith("emb/"):
        _validate_embedding(topic, payload)
    elif topic.startswith("evt/"):
        _validate_trigger(topic, payload)
    else:
        _validate_control(topic, payload)
    return Message(topic=topic, payload=payload)


def embedding_array(msg: Message) -> np.ndarray:
    """The embedding of a decoded embedding message as a writable native-endian 1-D array."""
    if msg.kind != "embedding":
        raise ValueError(f"topic {msg.topic!r}: not an embedding message")
    wire = EMBEDDING_DTYPES[msg.payload["dtype"]]
    return np.frombuffer(msg.payload["embedding"], dtype=wire).astype(wire.newbyteorder("="))
