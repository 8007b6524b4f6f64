"""Recorded sessions, format v1: parse and validate ``session.yaml``.

A session is a folder holding ``session.yaml`` plus the recordings it names. Everything is
checked here, before any source or actor starts: structure, types, units, that every file
exists, and that no path (including through a symlink) leaves the session folder. The full
format is documented in ``docs/session-format.md``; keep the two in step.

Nothing in this module reads media content (a bag stream's recording is opened to list its
topics and read the topic's first message: ``sources.bagspec``); sources (``sources/``) do that
and raise :class:`~sources.errors.SourceError` for problems only visible in the data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from sources.bagspec import bag_keys, is_bag_stream, parse_bag_stream
from sources.curve import load_rig_keys
from sources.errors import ConfigError
from sources.imu_csv import check_imu_header
from sources.yamlfile import read_yaml_file, short
from sources.base import MODALITIES

__all__ = [
    "FORMAT",
    "NAME_PATTERN",
    "IMU_ROLES",
    "IMU_PRESETS",
    "TIME_UNITS",
    "StreamSpec",
    "SessionSpec",
    "load_session",
    "session_from_dict",
    "LIVE_KINDS",
    "CLOCKS",
]

FORMAT = "bindstream.session/1"
# Session names and stream ids become topic segments and folder names: a letter or digit
# first (so never '.' or '..'), then at most 127 of letters, digits, '_', '.', '-'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NAME_RULE = "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"

# Seconds per unit; used for every time value read from a file (CSV rows, timestamp files, JSONL).
TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
ACCEL_UNITS = ("m/s^2", "g")
GYRO_UNITS = ("rad/s", "deg/s")
DEPTH_UNITS = ("mm", "m")

# Output order of the IMU sample (see sources/base.py): the mapping keys of ``columns``.
IMU_ROLES = ("t", "ax", "ay", "az", "gx", "gy", "gz")

# Ego4D's per-video IMU CSVs (one file per video uid). Units follow the Ego4D IMU docs:
# milliseconds, m/s^2, rad/s.
IMU_PRESETS: dict[str, dict[str, Any]] = {
    "ego4d": {
        "columns": {
            "t": "canonical_timestamp_ms",
            "ax": "accl_x",
            "ay": "accl_y",
            "az": "accl_z",
            "gx": "gyro_x",
            "gy": "gyro_y",
            "gz": "gyro_z",
        },
        "time_unit": "ms",
        "accel_unit": "m/s^2",
        "gyro_unit": "rad/s",
    }
}

_COMMON_KEYS = frozenset({"id", "modality", "source", "offset"})
_MODALITY_KEYS: dict[str, frozenset[str]] = {
    "vision": frozenset({"track"}),
    "audio": frozenset({"track"}),
    "imu": frozenset({"columns", "preset", "time_unit", "accel_unit", "gyro_unit", "where"}),
    "depth": frozenset({"timestamps", "time_unit", "depth_unit"}),
    "thermal": frozenset({"timestamps", "time_unit", "track"}),
    "text": frozenset({"time_unit"}),
}
_TOP_KEYS = frozenset({"format", "name", "streams", "description"})

# Live streams (docs/live.md): a stream with a ``kind`` is read from a device or socket instead
# of a file. Per kind: the modalities it can carry, its options, and the clock rules it allows
# (the first is the default).
LIVE_KINDS: dict[str, dict[str, Any]] = {
    "zmq": {"modalities": ("imu", "depth", "thermal", "vision"),
            "keys": frozenset({"endpoint", "bind", "topic", "max_bytes", "queue_bytes", "curve_server_key",
                              "curve_client_key"}),
            "clocks": ("device", "session", "arrival")},
    "imagezmq": {"modalities": ("vision",), "keys": frozenset({"endpoint", "mode", "color", "queue_bytes"}),
                 "clocks": ("arrival",)},
    "url": {"modalities": ("vision", "audio", "thermal"),
            "keys": frozenset({"url", "format", "options", "timeout_s", "max_backoff_s", "track"}),
            "clocks": ("device", "arrival")},
    "device": {"modalities": ("vision", "audio"),
               "keys": frozenset({"format", "device", "size", "rate", "options", "timeout_s", "track"}),
               "clocks": ("device", "arrival")},
}
# device: the stream's own clock, offset to the session clock estimated from arrival times;
# session: timestamps are already Unix time (the shared clock); arrival: stamped on arrival.
CLOCKS = ("device", "session", "arrival")
_LIVE_COMMON_KEYS = frozenset({"id", "modality", "kind", "clock", "offset"})


@dataclass(frozen=True)
class StreamSpec:
    """One validated stream of a session.

    ``source`` and ``timestamps`` are absolute, resolved, and inside the session folder
    ``root``; ``file_ids`` holds, per path, the ``(device, inode)`` they had when the session was
    loaded, so a source opening them can tell a file swapped since (``sources._common.open_checked``).
    ``columns`` is the IMU column mapping with any preset already expanded, as
    ``((role, column), ...)`` in :data:`IMU_ROLES` order. ``depth_unit`` is ``None`` when the
    file decides (16-bit PNG and integer ``.npy`` mean mm, float ``.npy`` means m).
    """

    id: str
    modality: str
    source: Path
    session: str = ""
    offset: float = 0.0  # seconds added to every file time to reach the session clock
    track: int = 0
    columns: tuple[tuple[str, str], ...] | None = None
    preset: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    time_unit: str = "s"
    accel_unit: str = "m/s^2"
    gyro_unit: str = "rad/s"
    timestamps: Path | None = None
    depth_unit: str | None = None
    live: str | None = None  # the live kind (zmq, imagezmq, url, device); None for a recording
    clock: str = "session"  # live only: device, session or arrival (see CLOCKS)
    options: tuple[tuple[str, Any], ...] = ()  # live: the kind's options; bag audio: its PCM layout
    topic: str | None = None  # a bag stream's topic (docs/session-format.md, "Bag streams")
    stamp: str = "header"  # bag streams: sample times from the message header, or the log time
    root: Path | None = None  # the session folder, resolved
    file_ids: tuple[tuple[str, int, int], ...] = ()  # (path, st_dev, st_ino) at load

    def option(self, name: str, default: Any = None) -> Any:
        """A live option by name (``default`` when not given)."""
        return dict(self.options).get(name, default)

    def rel(self, path: Path) -> str:
        """``path`` as error messages show it: relative to the session folder (never an
        absolute path, which would tell subscribers about the host); its name alone when it is
        not inside; as given when the spec has no folder."""
        if self.root is None:
            return str(path)
        p = Path(path)
        return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else p.name

    def file_id(self, path: Path) -> tuple[int, int] | None:
        """``(device, inode)`` of ``path`` when the session was loaded, if it was recorded."""
        key = str(path)
        return next(((dev, ino) for p, dev, ino in self.file_ids if p == key), None)

    @property
    def label(self) -> str:
        """``session 'x' stream 'y'``: the prefix every error about this stream starts with."""
        return f"session '{self.session}' stream '{self.id}'"

    @property
    def kind(self) -> str:
        """How the source is stored: ``media`` (a container PyAV opens), ``csv``, ``jsonl``,
        ``png_dir``, ``npy`` or ``bag`` (a topic of a ROS recording); for a live stream its live kind."""
        if self.live is not None:
            return self.live
        if self.topic is not None:
            return "bag"
        if self.modality in ("depth", "thermal"):
            if self.source.is_dir():
                return "png_dir"
            if self.source.suffix.lower() == ".npy":
                return "npy"
            return "media"
        return {"vision": "media", "audio": "media", "imu": "csv", "text": "jsonl"}[self.modality]


@dataclass(frozen=True)
class SessionSpec:
    """A validated session: its name (used in topics), folder and streams in file order."""

    name: str
    root: Path
    streams: tuple[StreamSpec, ...]
    description: str = ""

    @property
    def live(self) -> bool:
        """True when the streams are live (declared with a ``kind``), not recordings."""
        return any(s.live is not None for s in self.streams)

    def stream(self, stream_id: str) -> StreamSpec:
        """The stream with id ``stream_id``; ``KeyError`` naming the known ids otherwise."""
        for s in self.streams:
            if s.id == stream_id:
                return s
        known = ", ".join(s.id for s in self.streams)
        raise KeyError(f"session '{self.name}' has no stream '{stream_id}' (streams: {known})")


def load_session(path: str | Path) -> SessionSpec:
    """Read and validate a session folder (or its ``session.yaml``).

    Raises :class:`ConfigError` naming the file, session, stream and key for anything wrong.
    """
    p = Path(path)
    yaml_path = p / "session.yaml" if p.is_dir() else p
    if not yaml_path.is_file():
        raise ConfigError(f"{yaml_path.absolute()}: session file not found (expected a folder holding session.yaml)")
    doc = read_yaml_file(yaml_path)
    return session_from_dict(doc, yaml_path.parent, origin=str(yaml_path))


def session_from_dict(d: Any, root: str | Path, *, origin: str = "<inline session>") -> SessionSpec:
    """Validate an already parsed session document whose relative paths live under ``root``.

    Used by :func:`load_session` and by configs that inline a session. ``origin`` is the
    prefix of every error message (the file name, or a config key path).
    """
    try:
        root_p = Path(root).resolve()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{origin}: cannot resolve session folder {root}: {e}") from e
    if not root_p.is_dir():
        raise ConfigError(f"{origin}: session folder {root_p} does not exist")
    if not isinstance(d, Mapping):
        raise ConfigError(f"{origin}: expected a mapping with keys format, name, streams; got {_tname(d)}")
    _check_keys(d, _TOP_KEYS, origin)
    fmt = d.get("format")
    if fmt != FORMAT and not (fmt is None and _all_live(d.get("streams"))):
        raise ConfigError(f"{origin}: key 'format': expected '{FORMAT}', got {short(fmt)}")
    name = d.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{origin}: key 'name': expected a session name of {_NAME_RULE}, got {short(name)}")
    where = f"{origin}: session '{name}'"
    description = d.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: key 'description': expected a string, got {_tname(description)}")
    streams_raw = d.get("streams")
    if not isinstance(streams_raw, list) or not streams_raw:
        raise ConfigError(f"{where}: key 'streams': expected a non-empty list of streams, got {_tname(streams_raw)}")
    streams: list[StreamSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(streams_raw):
        spec = _parse_stream(raw, i, name, root_p, where)
        if spec.id in seen:
            raise ConfigError(f"{where}: stream id '{spec.id}' is used twice (stream ids must be unique)")
        seen.add(spec.id)
        streams.append(spec)
    if len({s.live is None for s in streams}) > 1:
        raise ConfigError(f"{where}: mixes live streams (with 'kind') and recorded streams; a session is either "
                          f"live or a recording")
    return SessionSpec(name=name, root=root_p, streams=tuple(streams), description=description)


def _parse_stream(raw: Any, index: int, session: str, root: Path, where: str) -> StreamSpec:
    at = f"{where} streams[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{at}: expected a mapping with keys id, modality, source; got {_tname(raw)}")
    sid = raw.get("id")
    if not isinstance(sid, str) or not NAME_PATTERN.fullmatch(sid):
        raise ConfigError(f"{at}: key 'id': expected a stream id of {_NAME_RULE}, got {short(sid)}")
    at = f"{where} stream '{sid}'"
    modality = raw.get("modality")
    if modality not in MODALITIES:
        raise ConfigError(f"{at}: key 'modality': expected one of {', '.join(MODALITIES)}, got {short(modality)}")
    if "kind" in raw:
        return _parse_live_stream(raw, sid, modality, session, root, at)
    bag = is_bag_stream(raw, root)
    _check_keys(raw, _COMMON_KEYS | (bag_keys(modality) if bag else _MODALITY_KEYS[modality]), at)

    offset = raw.get("offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise ConfigError(f"{at}: key 'offset': expected a number of seconds, got {_tname(offset)}")
    try:
        offset = float(offset)
    except OverflowError as e:
        raise ConfigError(f"{at}: key 'offset': {short(offset)} is out of range") from e
    if not math.isfinite(offset):
        raise ConfigError(f"{at}: key 'offset': expected a finite number, got {short(offset)}")

    if "source" not in raw:
        raise ConfigError(f"{at}: key 'source' is missing")
    source = _resolve_inside(root, raw["source"], f"{at}: key 'source'")
    if bag:
        return StreamSpec(id=sid, modality=modality, source=source, session=session, offset=offset,
                          **parse_bag_stream(raw, modality, source, at))
    kw: dict[str, Any] = {}

    if modality in ("vision", "audio", "imu", "text") and not source.is_file():
        raise ConfigError(f"{at}: key 'source': expected a file, {source} is a folder")

    if "track" in raw:
        track = raw["track"]
        if isinstance(track, bool) or not isinstance(track, int) or track < 0:
            raise ConfigError(f"{at}: key 'track': expected an integer >= 0, got {short(track)}")
        kw["track"] = track

    if "time_unit" in raw:
        kw["time_unit"] = _choice(raw["time_unit"], tuple(TIME_UNITS), f"{at}: key 'time_unit'")

    if modality == "imu":
        kw.update(_parse_imu(raw, at))
        check_imu_header(source, [c for _, c in kw["columns"]] + [c for c, _ in kw.get("where", ())], at)
    elif modality in ("depth", "thermal"):
        kw.update(_parse_frames(raw, modality, source, root, at))
    ids = _file_ids([source, kw.get("timestamps")], at)
    return StreamSpec(id=sid, modality=modality, source=source, session=session, offset=offset, root=root,
                      file_ids=ids, **kw)


def _file_ids(paths: list[Path | None], at: str) -> tuple[tuple[str, int, int], ...]:
    """``(path, device, inode)`` of each validated path, to be compared when it is opened."""
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = p.stat()
        except OSError as e:
            raise ConfigError(f"{at}: cannot read {p.name}: {e.strerror or e}") from e
        out.append((str(p), st.st_dev, st.st_ino))
    return tuple(out)


def _all_live(streams: Any) -> bool:
    return isinstance(streams, list) and bool(streams) and all(isinstance(s, Mapping) and "kind" in s for s in streams)


def _parse_curve_client(raw: Mapping, opts: dict[str, Any], at: str) -> None:
    """``curve_server_key`` (the rig's public ``.key``) + ``curve_client_key`` (our ``.key_secret``):
    the SUB socket connects as a CurveZMQ client; both or neither, checked before anything runs."""
    given = [k for k in ("curve_server_key", "curve_client_key") if k in raw]
    if not given:
        return
    if len(given) == 1:
        missing = ({"curve_server_key", "curve_client_key"} - set(given)).pop()
        raise ConfigError(f"{at}: key '{given[0]}' needs '{missing}' too")
    if opts.get("bind"):
        raise ConfigError(f"{at}: CurveZMQ keys need the stream to connect to the rig (bind: false)")
    try:
        load_rig_keys(str(raw["curve_server_key"]), str(raw["curve_client_key"]))
    except ConfigError as e:
        raise ConfigError(f"{at}: CurveZMQ keys: {e}") from None
    opts["curve_server_key"] = str(raw["curve_server_key"])
    opts["curve_client_key"] = str(raw["curve_client_key"])


class _LiveOptions:
    """A live stream's kind-specific options, each checked as it is read (``opts``)."""

    def __init__(self, raw: Mapping, kind: str, at: str) -> None:
        self.raw, self.kind, self.at = raw, kind, at
        self.opts: dict[str, Any] = {}

    def text(self, key: str, required: bool = False) -> None:
        if key not in self.raw:
            if required:
                raise ConfigError(f"{self.at}: key '{key}' is missing (kind '{self.kind}' needs it)")
            return
        v = self.raw[key]
        if not isinstance(v, str) or not v or "\x00" in v:
            raise ConfigError(f"{self.at}: key '{key}': expected a non-empty string, got {_tname(v)}")
        self.opts[key] = v

    def number(self, key: str, lo: float, integer: bool = False) -> None:
        if key in self.raw:
            v = self.raw[key]
            ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
            if not ok or not math.isfinite(v) or v < lo:
                raise ConfigError(f"{self.at}: key '{key}': expected {'an integer' if integer else 'a number'} >= {lo}, "
                                  f"got {_tname(v)}")
            self.opts[key] = v

    def flag(self, key: str) -> None:
        if key in self.raw:
            if not isinstance(self.raw[key], bool):
                raise ConfigError(f"{self.at}: key '{key}': expected true/false, got {_tname(self.raw[key])}")
            self.opts[key] = self.raw[key]

    def endpoint(self) -> None:
        self.text("endpoint", required=True)
        if "://" not in self.opts["endpoint"]:
            raise ConfigError(f"{self.at}: key 'endpoint': expected a ZeroMQ endpoint like tcp://127.0.0.1:5560, "
                              f"got {short(self.opts['endpoint'])}")

    def zmq(self) -> None:
        self.endpoint()
        self.flag("bind")
        if "topic" in self.raw:
            if not isinstance(self.raw["topic"], str):
                raise ConfigError(f"{self.at}: key 'topic': expected a string, got {_tname(self.raw['topic'])}")
            self.opts["topic"] = self.raw["topic"]
        self.number("max_bytes", 1, integer=True)
        self.number("queue_bytes", 1, integer=True)
        _parse_curve_client(self.raw, self.opts, self.at)

    def imagezmq(self) -> None:
        self.endpoint()
        self.opts["mode"] = _choice(self.raw.get("mode", "reqrep"), ("reqrep", "pubsub"), f"{self.at}: key 'mode'")
        self.opts["color"] = _choice(self.raw.get("color", "bgr"), ("bgr", "rgb"), f"{self.at}: key 'color'")
        self.number("queue_bytes", 1, integer=True)

    def av(self) -> None:
        """``url`` and ``device``: what PyAV opens, and FFmpeg's own options."""
        self.text("url", required=self.kind == "url")
        self.text("format", required=self.kind == "device")
        self.text("device", required=self.kind == "device")
        self.text("size")
        if "size" in self.opts and not re.fullmatch(r"[0-9]+x[0-9]+", self.opts["size"]):
            raise ConfigError(f"{self.at}: key 'size': expected WIDTHxHEIGHT like 640x480, got {short(self.opts['size'])}")
        for key in ("rate", "timeout_s", "max_backoff_s"):
            self.number(key, 0)
        self.number("track", 0, integer=True)
        if "options" in self.raw:
            o = self.raw["options"]
            if not isinstance(o, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
                    for k, v in o.items()):
                raise ConfigError(f"{self.at}: key 'options': expected a mapping of FFmpeg option names to strings or "
                                  f"numbers, got {_tname(o)}")
            self.opts["options"] = tuple((k, str(v)) for k, v in o.items())


def _parse_live_stream(raw: Mapping, sid: str, modality: str, session: str, root: Path, at: str) -> StreamSpec:
    kind = _choice(raw["kind"], tuple(LIVE_KINDS), f"{at}: key 'kind'")
    rule = LIVE_KINDS[kind]
    _check_keys(raw, _LIVE_COMMON_KEYS | rule["keys"], at)
    if modality not in rule["modalities"]:
        raise ConfigError(f"{at}: key 'modality': kind '{kind}' carries {', '.join(rule['modalities'])}, not {short(modality)}")
    clock = _choice(raw.get("clock", rule["clocks"][0]), rule["clocks"], f"{at}: key 'clock'")
    offset = raw.get("offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ConfigError(f"{at}: key 'offset': expected a finite number of seconds, got {_tname(offset)}")
    options = _LiveOptions(raw, kind, at)
    getattr(options, kind if kind in ("zmq", "imagezmq") else "av")()
    return StreamSpec(id=sid, modality=modality, source=root, session=session, offset=float(offset),
                      live=kind, clock=clock, options=tuple(sorted(options.opts.items())))


def _parse_imu(raw: Mapping, at: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    has_cols, has_preset = "columns" in raw, "preset" in raw
    if has_cols == has_preset:
        raise ConfigError(f"{at}: imu streams need exactly one of 'columns' or 'preset' (presets: {', '.join(IMU_PRESETS)})")
    if has_preset:
        preset = _choice(raw["preset"], tuple(IMU_PRESETS), f"{at}: key 'preset'")
        p = IMU_PRESETS[preset]
        kw["preset"] = preset
        cols = dict(p["columns"])
        # Explicit unit keys still win over the preset's.
        kw.update({k: p[k] for k in ("time_unit", "accel_unit", "gyro_unit")})
    else:
        cols_raw = raw["columns"]
        if not isinstance(cols_raw, Mapping):
            raise ConfigError(f"{at}: key 'columns': expected a mapping of {', '.join(IMU_ROLES)} to CSV column names, "
                              f"got {_tname(cols_raw)}")
        _check_keys(cols_raw, frozenset(IMU_ROLES), f"{at}: key 'columns'")
        cols = {}
        for role in IMU_ROLES:
            if role not in cols_raw:
                raise ConfigError(f"{at}: key 'columns': role '{role}' is missing (need {', '.join(IMU_ROLES)})")
            col = cols_raw[role]
            if not isinstance(col, str) or not col:
                raise ConfigError(f"{at}: key 'columns.{role}': expected a CSV column name, got {short(col)}")
            cols[role] = col
    kw["columns"] = tuple((r, cols[r]) for r in IMU_ROLES)
    if "time_unit" in raw:
        kw["time_unit"] = _choice(raw["time_unit"], tuple(TIME_UNITS), f"{at}: key 'time_unit'")
    if "accel_unit" in raw:
        kw["accel_unit"] = _choice(raw["accel_unit"], ACCEL_UNITS, f"{at}: key 'accel_unit'")
    if "gyro_unit" in raw:
        kw["gyro_unit"] = _choice(raw["gyro_unit"], GYRO_UNITS, f"{at}: key 'gyro_unit'")
    if "where" in raw:
        w = raw["where"]
        if not isinstance(w, Mapping) or not w:
            raise ConfigError(f"{at}: key 'where': expected a non-empty mapping of column to value, got {_tname(w)}")
        pairs = []
        for col, val in w.items():
            if not isinstance(col, str) or not col:
                raise ConfigError(f"{at}: key 'where': expected column names as keys, got {short(col)}")
            if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                raise ConfigError(f"{at}: key 'where.{col}': expected a string or number to match, got {_tname(val)}")
            pairs.append((col, str(val)))
        kw["where"] = tuple(pairs)
    return kw


def _parse_frames(raw: Mapping, modality: str, source: Path, root: Path, at: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if source.is_dir():
        kind = "png_dir"
    elif source.suffix.lower() == ".npy":
        kind = "npy"
    elif modality == "thermal":
        kind = "media"
    else:
        raise ConfigError(f"{at}: key 'source': depth expects a folder of 16-bit PNGs or a .npy file, got {source.name}")

    if kind == "media":
        if "timestamps" in raw:
            raise ConfigError(f"{at}: key 'timestamps': not used for a video source (times come from the container)")
        if "time_unit" in raw:
            raise ConfigError(f"{at}: key 'time_unit': not used for a video source (times come from the container)")
        return kw
    if "track" in raw:
        raise ConfigError(f"{at}: key 'track': only used for a video source, not a {'PNG folder' if kind == 'png_dir' else '.npy file'}")

    if kind == "png_dir":
        pngs = [c for c in source.iterdir() if c.suffix.lower() == ".png"]
        if not pngs:
            raise ConfigError(f"{at}: key 'source': folder {source} holds no .png files")
        for c in pngs:
            _contained(root, c, f"{at}: key 'source'")
        if "timestamps" not in raw:
            raise ConfigError(f"{at}: key 'timestamps' is missing (a PNG folder needs a timestamps file)")
        kw["timestamps"] = _resolve_inside(root, raw["timestamps"], f"{at}: key 'timestamps'")
    else:
        if "timestamps" in raw:
            kw["timestamps"] = _resolve_inside(root, raw["timestamps"], f"{at}: key 'timestamps'")
        else:
            companion = source.with_name(source.stem + "_t.npy")
            if not companion.exists():
                raise ConfigError(f"{at}: key 'timestamps' is missing and no companion {companion.name} exists next to {source.name}")
            kw["timestamps"] = _contained(root, companion, f"{at}: companion {companion.name}")
    if not kw["timestamps"].is_file():
        raise ConfigError(f"{at}: key 'timestamps': expected a file, {kw['timestamps']} is a folder")

    if "depth_unit" in raw:
        kw["depth_unit"] = _choice(raw["depth_unit"], DEPTH_UNITS, f"{at}: key 'depth_unit'")
    return kw


def _resolve_inside(root: Path, rel: Any, at: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise ConfigError(f"{at}: expected a path relative to the session folder, got {short(rel)}")
    if "\x00" in rel:
        raise ConfigError(f"{at}: path contains a NUL byte: {short(rel)}")
    p = Path(rel)
    if p.is_absolute():
        raise ConfigError(f"{at}: expected a path relative to the session folder, got absolute path {short(rel)}")
    resolved = _contained(root, root / p, at)
    if not resolved.exists():
        raise ConfigError(f"{at}: {short(rel)} does not exist in session folder {root}")
    return resolved


def _contained(root: Path, p: Path, at: str) -> Path:
    try:
        resolved = p.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop on Python < 3.13
        raise ConfigError(f"{at}: cannot resolve {p}: {e}") from e
    # resolve() follows symlinks, so a link pointing outside is caught here too.
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{at}: {p} resolves to {resolved}, outside the session folder {root}")
    return resolved


def _choice(value: Any, allowed: tuple[str, ...], at: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{at}: expected one of {', '.join(allowed)}, got {short(value)}")
    return value


def _check_keys(d: Mapping, allowed: frozenset[str], at: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{at}: unknown key {short(k)} (allowed: {', '.join(sorted(allowed))})")


def _tname(v: Any) -> str:
    return f"{type(v).__name__} {short(v)}"
