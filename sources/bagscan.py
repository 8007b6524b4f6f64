"""ROS 1 bags and MCAP files read front to back, one record at a time.

Both formats are a sequence of length-prefixed records with their index at the end of the file.
Reading the records in file order (instead of through the index, as ``rosbags``' readers do)
keeps memory flat however long the recording (only the current chunk is held: no per-message
index), and it reads a file whose end is missing: a recorder that was killed leaves a ROS 1 bag
without its index and an MCAP file without its summary and footer. Everything before the damage
comes out; then :class:`BagDamage` says where the damage is.

Formats: ROS bag v2.0 (http://wiki.ros.org/Bags/Format/2.0) with chunks stored plain, bz2 or
lz4; MCAP (https://mcap.dev/spec) with chunks stored plain, lz4 or zstd, in a plain file or a
zstd-compressed one (a ROS 2 bag recorded with file compression), decompressed as it is read.
"""

from __future__ import annotations

import bz2
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import lz4.frame

try:  # Python 3.14 has zstd in the standard library; rosbags depends on the backport before that
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd  # type: ignore[no-redef]

__all__ = ["BagDamage", "Conn", "RawMessage", "ros1_messages", "mcap_messages"]

ROS1_MAGIC = b"#ROSBAG V2.0\n"
MCAP_MAGIC = b"\x89MCAP0\r\n"
# A length field past these is damage, not a record (a ROS 1 chunk is ~768 KB by default; an MCAP
# chunk or message can be large, but not larger than the file).
_MAX_HEADER = 1 << 20


class BagDamage(Exception):
    """The file ends early or holds something that is not a record, at byte ``offset``."""

    def __init__(self, path: Path, offset: int, what: str) -> None:
        super().__init__(f"{path}: {what} at byte offset {offset}")
        self.path, self.offset, self.what = path, offset, what


@dataclass(frozen=True)
class Conn:
    """A connection (ROS 1) or channel (MCAP): its topic, message type and type definition.
    ``msgdef_format`` is ``msg`` or ``idl``; ``msgdef`` may be empty (then the default types)."""

    id: int
    topic: str
    msgtype: str
    msgdef: str
    msgdef_format: str = "msg"


@dataclass(frozen=True)
class RawMessage:
    """One serialised message: its connection, the time the recorder logged it (ns) and bytes."""

    conn: Conn
    log_ns: int
    data: bytes


class _Records:
    """Exact reads from a file, raising :class:`BagDamage` at a short read."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def read(self, n: int, what: str) -> bytes:
        at = self.f.tell()
        data = self.f.read(n)
        if len(data) != n:
            raise BagDamage(self.path, at, f"file ends inside a {what} ({len(data)} of {n} bytes)")
        return data


def _ros1_fields(buf: bytes, path: Path, at: int) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise BagDamage(path, at, "malformed record header")
        (n,) = struct.unpack_from("<I", buf, i)
        field = buf[i + 4:i + 4 + n]
        name, eq, value = field.partition(b"=")
        if len(field) != n or not eq:
            raise BagDamage(path, at, "malformed record header")
        fields[name.decode("ascii", "replace")] = value
        i += 4 + n
    return fields


def _ros1_stream(rec: _Records, end: int | None = None) -> Iterator[tuple[int, dict[str, bytes], bytes]]:
    """(offset, header fields, data) of each record until ``end`` or the end of the file."""
    f, path = rec.f, rec.path
    while end is None or f.tell() < end:
        at = f.tell()
        head = f.read(4)
        if not head and end is None:
            return
        if len(head) != 4:
            raise BagDamage(path, at, "file ends inside a record")
        (hlen,) = struct.unpack("<I", head)
        if hlen > _MAX_HEADER:
            raise BagDamage(path, at, f"record header of {hlen} bytes (not a record)")
        fields = _ros1_fields(rec.read(hlen, "record header"), path, at)
        (dlen,) = struct.unpack("<I", rec.read(4, "record"))
        yield at, fields, rec.read(dlen, "record")


_ROS1_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"none": bytes, "bz2": bz2.decompress, "lz4": lz4.frame.decompress}


def _ros1_conn(fields: dict[str, bytes], data: bytes, path: Path, at: int) -> Conn:
    info = _ros1_fields(data, path, at)
    text = {k: v.decode("utf-8", "replace") for k, v in info.items()}
    topic = fields.get("topic", b"").decode("utf-8", "replace")
    return Conn(struct.unpack("<I", fields["conn"])[0], topic if topic.startswith("/") else "/" + topic,
                _normalize(text.get("type", "")), text.get("message_definition", ""), "msg")


def ros1_messages(path: Path, topics: set[str] | None = None,
                  on_conn: Callable[[Conn], None] | None = None) -> Iterator[RawMessage]:
    """The messages of a ROS 1 bag in file order (the order the recorder wrote them), of the
    given ``topics`` only when given. ``on_conn`` sees every connection as it is found."""
    conns: dict[int, Conn] = {}
    with open(path, "rb") as f:
        rec = _Records(f, path)
        if f.read(len(ROS1_MAGIC)) != ROS1_MAGIC:
            raise BagDamage(path, 0, "not a ROS bag v2.0 (its first line is not '#ROSBAG V2.0')")
        for at, fields, data in _ros1_stream(rec):
            op = fields.get("op", b"\x00")[0]
            if op == 0x07:
                _note(conns, _ros1_conn(fields, data, path, at), on_conn)
            elif op == 0x05:
                method = fields.get("compression", b"none").decode("ascii", "replace")
                if method not in _ROS1_DECOMPRESS:
                    raise BagDamage(path, at, f"chunk compression {method!r} (supported: none, bz2, lz4)")
                try:
                    inner = _ROS1_DECOMPRESS[method](data)
                except (OSError, ValueError, RuntimeError, EOFError) as e:
                    raise BagDamage(path, at, f"chunk that does not decompress ({e})") from None
                yield from _ros1_chunk(inner, path, at, conns, topics, on_conn)
            elif op == 0x02:  # message data outside a chunk (unchunked writers)
                yield from _ros1_message(fields, data, conns, topics, path, at)


def _ros1_chunk(inner: bytes, path: Path, at: int, conns: dict[int, Conn], topics: set[str] | None,
                on_conn: Callable[[Conn], None] | None) -> Iterator[RawMessage]:
    sub = _Records(io.BytesIO(inner), path)
    try:
        for _, fields, data in _ros1_stream(sub, len(inner)):
            op = fields.get("op", b"\x00")[0]
            if op == 0x07:
                _note(conns, _ros1_conn(fields, data, path, at), on_conn)
            elif op == 0x02:
                yield from _ros1_message(fields, data, conns, topics, path, at)
    except BagDamage as e:
        raise BagDamage(path, at, f"chunk with a damaged record ({e.what})") from None


def _ros1_message(fields: dict[str, bytes], data: bytes, conns: dict[int, Conn], topics: set[str] | None,
                  path: Path, at: int) -> Iterator[RawMessage]:
    try:
        cid = struct.unpack("<I", fields["conn"])[0]
        sec, nsec = struct.unpack("<II", fields["time"])
    except (KeyError, struct.error):
        raise BagDamage(path, at, "message record without its connection or time") from None
    conn = conns.get(cid)
    if conn is None:
        raise BagDamage(path, at, f"message of connection {cid}, which no connection record defined")
    if topics is None or conn.topic in topics:
        yield RawMessage(conn, sec * 1_000_000_000 + nsec, data)


def _note(conns: dict[int, Conn], conn: Conn, on_conn: Callable[[Conn], None] | None) -> None:
    if conn.id not in conns:
        conns[conn.id] = conn
        if on_conn is not None:
            on_conn(conn)


def _normalize(msgtype: str) -> str:
    """ROS 1 names types ``pkg/Type``; rosbags' type store (and ROS 2) ``pkg/msg/Type``."""
    parts = msgtype.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else msgtype


def _mcap_str(buf: bytes, i: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", buf, i)
    return buf[i + 4:i + 4 + n].decode("utf-8", "replace"), i + 4 + n


def mcap_messages(path: Path, topics: set[str] | None = None,
                  on_conn: Callable[[Conn], None] | None = None, zstd_file: bool = False) -> Iterator[RawMessage]:
    """The messages of an MCAP file in file order, of ``topics`` only when given; ``on_conn``
    sees every channel as it is found. Ends at the data-end or footer record. ``zstd_file``: the
    whole file is zstd-compressed (a ROS 2 bag's file compression), decompressed as it is read;
    offsets in :class:`BagDamage` then count decompressed bytes."""
    schemas: dict[int, tuple[str, str, str]] = {}
    conns: dict[int, Conn] = {}
    with (zstd.open(path, "rb") if zstd_file else open(path, "rb")) as f:
        try:
            if f.read(8) != MCAP_MAGIC:
                raise BagDamage(path, 0, "not an MCAP file (no MCAP magic)")
            state = (schemas, conns, topics, on_conn)
            yield from _mcap_records(_Records(f, path), None, state, path, 0)
        except (EOFError, zstd.ZstdError) as e:  # only a zstd file raises these
            raise BagDamage(path, f.tell(), f"zstd-compressed file ends early or is damaged ({e}); offset counts "
                                            f"decompressed bytes") from None
        except BagDamage as e:
            if not zstd_file:
                raise
            raise BagDamage(path, e.offset, f"{e.what}; offset counts decompressed bytes") from None


def _mcap_records(rec: _Records, end: int | None, state: tuple, path: Path, base: int) -> Iterator[RawMessage]:
    schemas, conns, topics, on_conn = state
    f = rec.f
    while end is None or f.tell() < end:
        at = base + f.tell()
        op_b = f.read(1)
        if not op_b:
            if end is None:
                raise BagDamage(path, at, "file ends without MCAP's data-end or footer record")
            return
        (n,) = struct.unpack("<Q", rec.read(8, "record length"))
        op = op_b[0]
        if op in (0x02, 0x0F):  # footer, data end: the summary that follows repeats what was read
            return
        body = rec.read(n, "record")
        try:
            if op == 0x03:
                (sid,) = struct.unpack_from("<H", body)
                name, i = _mcap_str(body, 2)
                enc, i = _mcap_str(body, i)
                (dn,) = struct.unpack_from("<I", body, i)
                schemas[sid] = (name, enc, body[i + 4:i + 4 + dn].decode("utf-8", "replace"))
            elif op == 0x04:
                cid, sid = struct.unpack_from("<HH", body)
                topic, _ = _mcap_str(body, 4)
                name, enc, text = schemas.get(sid, ("", "", ""))
                _note(conns, Conn(cid, topic, name, text, "idl" if enc == "ros2idl" else "msg"), on_conn)
            elif op == 0x05:
                cid, _, log_ns = struct.unpack_from("<HIQ", body)
                conn = conns.get(cid)
                if conn is None:
                    raise BagDamage(path, at, f"message on channel {cid}, which no channel record defined")
                if topics is None or conn.topic in topics:
                    yield RawMessage(conn, log_ns, body[22:])
            elif op == 0x06 and end is None:
                yield from _mcap_chunk(body, state, path, at)
        except struct.error:
            raise BagDamage(path, at, f"malformed record (op 0x{op:02x})") from None


def _mcap_chunk(body: bytes, state: tuple, path: Path, at: int) -> Iterator[RawMessage]:
    try:
        size = struct.unpack_from("<Q", body, 16)[0]
        method, i = _mcap_str(body, 28)
        (clen,) = struct.unpack_from("<Q", body, i)
        data = body[i + 8:i + 8 + clen]
        if method == "":
            inner = bytes(data)
        elif method == "lz4":
            inner = lz4.frame.decompress(data)
        elif method == "zstd":
            inner = zstd.decompress(data)
        else:
            raise BagDamage(path, at, f"chunk compression {method!r} (supported: none, lz4, zstd)")
    except (struct.error, OSError, ValueError, RuntimeError, EOFError, zstd.ZstdError) as e:
        raise BagDamage(path, at, f"chunk that does not decompress ({e})") from None
    if len(inner) != size:
        raise BagDamage(path, at, f"chunk of {len(inner)} bytes where its header says {size}")
    try:
        yield from _mcap_records(_Records(io.BytesIO(inner), path), len(inner), state, path, 0)
    except BagDamage as e:
        raise BagDamage(path, at, f"chunk with a damaged record ({e.what})") from None
