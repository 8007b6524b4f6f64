"""Opening ROS recordings without ROS: a ROS 1 ``.bag``, a ROS 2 bag folder (``metadata.yaml``
with sqlite3 or MCAP storage) or a plain ``.mcap`` file. Lists their topics and yields one
topic's messages, deserialised by ``rosbags``' type system.

ROS 1 bags and MCAP files (plain, or a ROS 2 folder's) are read front to back by
:mod:`sources.bagscan` (flat memory, and a file cut short still yields what it holds); sqlite3
storage through ``rosbags.highlevel.AnyReader``. Topic lists come from the file's index
(``rosbags``), or from a scan when the index is missing or damaged.

A ROS 2 bag's own compression (``compression_mode`` / ``compression_format`` in metadata.yaml)
is zstd by ``file`` or by ``message``; any other is a :class:`BagError`. A file-compressed MCAP
file is decompressed as it is scanned and its topics are listed from metadata.yaml; sqlite3
storage is left to ``rosbags`` (which decompresses a file-compressed database into a temporary
file each time it opens the bag).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

from sources.bagscan import BagDamage, Conn, RawMessage, mcap_messages, ros1_messages
from sources.yamlfile import read_yaml_file

try:  # Python 3.14 has zstd in the standard library; rosbags depends on the backport before that
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd  # type: ignore[no-redef]

__all__ = ["BagError", "BagDamage", "Topic", "Bag", "bag_kind"]


class BagError(Exception):
    """A recording that cannot be opened or listed at all (the message says why)."""


@dataclass(frozen=True)
class Topic:
    """A topic of a bag: its name, message type (``pkg/msg/Type``) and message count
    (``None`` where only a scan could tell)."""

    name: str
    msgtype: str
    count: int | None


def bag_kind(path: Path) -> str | None:
    """``ros1`` (a ``.bag`` file), ``mcap`` (a ``.mcap`` file), ``ros2`` (a folder holding
    ``metadata.yaml``), or None."""
    if path.is_dir():
        return "ros2" if (path / "metadata.yaml").is_file() else None
    suffix = path.suffix.lower()
    return {".bag": "ros1", ".mcap": "mcap"}.get(suffix)


class Bag:
    """One recording. ``topics()`` lists it; ``messages(topic)`` yields ``(log_ns, message)``
    in file order and raises :class:`BagDamage` (with the byte offset) where the file is damaged,
    after every message before it. ``undecodable`` counts messages whose bytes did not
    deserialise (skipped)."""

    def __init__(self, path: Path) -> None:
        kind = bag_kind(path)
        if kind is None:
            raise BagError(f"{path} is not a ROS recording (expected a .bag file, a .mcap file or a ROS 2 bag "
                           f"folder holding metadata.yaml)")
        self.path, self.kind = path, kind
        self.undecodable = 0
        self.compression: str | None = None  # a ROS 2 bag's: "file" or "message" (zstd)
        self._meta_topics: list = []
        self.storage, self.files = self._layout()

    def _layout(self) -> tuple[str, list[Path]]:
        if self.kind == "ros1":
            return "ros1", [self.path]
        if self.kind == "mcap":
            return "mcap", [self.path]
        try:
            meta = read_yaml_file(self.path / "metadata.yaml")
            info = meta["rosbag2_bagfile_information"]
            storage = str(info.get("storage_identifier", ""))
            files = [self.path / str(p) for p in info.get("relative_file_paths", [])]
            mode = str(info.get("compression_mode") or "none").lower()
            fmt = str(info.get("compression_format") or "").lower()
            self._meta_topics = list(info.get("topics_with_message_count") or [])
        except Exception as e:  # any malformed metadata: named, never a traceback
            raise BagError(f"{self.path / 'metadata.yaml'}: not a ROS 2 bag's metadata ({e})") from None
        if storage not in ("sqlite3", "mcap"):
            raise BagError(f"{self.path}: storage {storage!r} is not supported (supported: sqlite3, mcap)")
        if mode != "none":
            if mode not in ("file", "message") or fmt != "zstd":
                raise BagError(f"{self.path}: metadata.yaml says compression_mode {mode!r} with compression_format "
                               f"{fmt!r}, which is not supported (supported: no compression, or compression_format "
                               f"zstd with compression_mode file or message)")
            self.compression = mode
        for p in files:
            if not p.resolve().is_relative_to(self.path.resolve()) or not p.is_file():
                raise BagError(f"{self.path}: metadata.yaml names {p.name}, not a file inside the bag folder")
        return storage, files

    def topics(self) -> dict[str, Topic]:
        """Every topic, from the index; from a scan of the files when the index is unreadable;
        from metadata.yaml for a file-compressed MCAP bag (its index is inside the compression)."""
        if self.compression == "file" and self.storage == "mcap":
            return self._topics_from_metadata()
        try:
            with AnyReader([self.path], default_typestore=get_typestore(Stores.LATEST)) as r:
                return {name: Topic(name, info.msgtype or "", info.msgcount) for name, info in r.topics.items()}
        except Exception as e:  # rosbags raises many kinds (AnyReaderError, OSError, ...) on a damaged file
            if self.storage == "sqlite3":
                raise BagError(f"{self.path}: cannot open: {e}") from None
        found: dict[str, Topic] = {}
        try:
            for _ in self._raw(None, lambda c: found.setdefault(c.topic, Topic(c.topic, c.msgtype, None))):
                pass
        except BagDamage:
            pass  # what comes before the damage is listed; reading the topic reports the damage
        if not found:
            raise BagError(f"{self.path}: no topic found (the file is damaged before its first connection record)")
        return found

    def _topics_from_metadata(self) -> dict[str, Topic]:
        try:
            found = {}
            for entry in self._meta_topics:
                name, msgtype = str(entry["topic_metadata"]["name"]), str(entry["topic_metadata"]["type"])
                found[name] = Topic(name, msgtype, int(entry.get("message_count", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise BagError(f"{self.path / 'metadata.yaml'}: malformed topics_with_message_count ({e})") from None
        if not found:
            raise BagError(f"{self.path / 'metadata.yaml'}: lists no topic")
        return found

    def _raw(self, topics: set[str] | None, on_conn: Any = None) -> Iterator[RawMessage]:
        for f in self.files:
            if self.storage == "ros1":
                yield from ros1_messages(f, topics, on_conn)
            else:
                yield from mcap_messages(f, topics, on_conn, zstd_file=self.compression == "file")

    def first(self, topic: str) -> Any | None:
        """The first message of ``topic`` that deserialises, or None."""
        try:
            for _, msg in self.messages(topic):
                return msg
        except BagDamage:
            return None
        return None

    def messages(self, topic: str) -> Iterator[tuple[int, Any]]:
        if self.storage == "sqlite3":
            yield from self._sqlite_messages(topic)
            return
        types = _Types(ros1=self.storage == "ros1")
        for m in self._raw({topic}):
            if self.compression == "message":
                try:
                    m = RawMessage(m.conn, m.log_ns, zstd.decompress(m.data))
                except (zstd.ZstdError, EOFError, ValueError):
                    self.undecodable += 1
                    continue
            msg = types.deserialize(m)
            if msg is None:
                self.undecodable += 1
                continue
            yield m.log_ns, msg

    def _sqlite_messages(self, topic: str) -> Iterator[tuple[int, Any]]:
        count = 0
        try:
            with AnyReader([self.path], default_typestore=get_typestore(Stores.LATEST)) as r:
                conns = [c for c in r.connections if c.topic == topic]
                for conn, log_ns, raw in r.messages(connections=conns):
                    try:
                        msg = r.deserialize(raw, conn.msgtype)
                    except Exception:  # a message whose bytes do not fit its type: skipped, counted
                        self.undecodable += 1
                        continue
                    count += 1
                    yield log_ns, msg
        except BagDamage:
            raise
        except Exception as e:  # sqlite errors on a damaged database
            raise BagDamage(self.path, -1, f"database error after {count} messages of {topic}: {e}") from None


class _Types:
    """Message types registered from the definitions the recording carries (every ROS 1 bag,
    MCAP schemas); recordings without them fall back to rosbags' built-in types."""

    def __init__(self, ros1: bool) -> None:
        self.ros1 = ros1
        self.store = get_typestore(Stores.EMPTY)
        self.default = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.LATEST)
        self._known: dict[int, Any] = {}

    def _store_for(self, conn: Conn) -> Any:
        store = self._known.get(conn.id)
        if store is not None:
            return store
        store = self.default
        if conn.msgdef.strip():
            try:
                if conn.msgdef_format == "idl":
                    typs: dict = {}
                    sep = "=" * 80 + "\n"
                    parts = conn.msgdef.split(sep)[1:] if conn.msgdef.startswith(f"{sep}IDL: ") else [conn.msgdef]
                    for part in parts:
                        typs.update(get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part))
                else:
                    typs = get_types_from_msg(conn.msgdef, conn.msgtype)
                fresh = {k: v for k, v in typs.items() if k not in self.store.fielddefs}
                self.store.register(fresh)
                store = self.store
            except Exception:  # an unparsable definition: the built-in types may still know it
                store = self.default
        self._known[conn.id] = store
        return store

    def deserialize(self, m: RawMessage) -> Any | None:
        store = self._store_for(m.conn)
        try:
            if self.ros1:
                return store.deserialize_ros1(m.data, m.conn.msgtype)
            return store.deserialize_cdr(m.data, m.conn.msgtype)
        except Exception:  # bytes that do not fit the type: the caller counts them
            return None
