"""``import-bag``: the session.yaml for a ROS recording, one stream per topic bindstream reads.

The modality comes from the message type and, for images, the first message's encoding; topic
names tell thermal and depth from vision where an encoding allows several. Topics left out are
listed as comments with the reason. The recording is referenced in place, never copied: by a
relative path when it lies inside the session folder, else by a hard link inside it (the same
file, no extra space; a symbolic link pointing out of the session folder would break
containment, docs/session-format.md).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sources.bagfile import Bag, BagError, Topic
from sources.bagmsgs import AUDIO_INFO, AUDIO_TYPES, SUPPORTED, encoding_of, guess_modality
from sources.errors import ConfigError
from sources.session import FORMAT, NAME_PATTERN, load_session
from sources.yamlfile import read_yaml_file

__all__ = ["import_bag"]


def import_bag(bag_path: str | Path, out_dir: str | Path, name: str | None = None) -> tuple[Path, list[str], list[str]]:
    """Write ``out_dir/session.yaml`` for the recording at ``bag_path`` and check that it loads.
    Returns (session.yaml, lines of streams written, lines of topics skipped). :class:`ConfigError`
    for a recording that does not open, an existing session.yaml, or no usable topic."""
    bag_p = Path(bag_path).absolute()
    out = Path(out_dir).absolute()
    _check_ros2_metadata(bag_p)
    try:
        bag = Bag(bag_p)
        topics = bag.topics()
    except BagError as e:
        raise ConfigError(f"import-bag: {e}") from None
    yaml_path = out / "session.yaml"
    if yaml_path.exists():
        raise ConfigError(f"import-bag: {yaml_path} exists; choose another --out folder (nothing was changed)")
    streams, skipped = _plan(bag, topics)
    if not streams:
        raise ConfigError(f"import-bag: {bag_p.name} has no topic bindstream reads; topics: "
                          + "; ".join(skipped))
    out.mkdir(parents=True, exist_ok=True)
    source = _reference(bag_p, out)
    session = name or _name(bag_p)
    if not NAME_PATTERN.fullmatch(session):
        raise ConfigError(f"import-bag: session name {session!r} must be 1-128 letters, digits, '_', '.' or '-'")
    lines = [f"# Written by import-bag from {bag_p.name}: one stream per topic bindstream reads.",
             f"format: {FORMAT}", f"name: {session}", "streams:"]
    written = []
    for sid, topic, modality, extra in streams:
        keys = {"id": sid, "modality": modality, "source": source, "topic": topic, **extra}
        lines.append("  - {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "}")
        written.append(f"{topic} -> {sid} ({modality})")
    if skipped:
        lines.append("# Topics skipped:")
        lines += [f"#   {s}" for s in skipped]
    yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load_session(yaml_path)  # the session as written must load (ConfigError otherwise)
    return yaml_path, written, skipped


def _check_ros2_metadata(bag_p: Path) -> None:
    """A ROS 2 bag folder's metadata.yaml must be the mapping ``ros2 bag record`` writes, with
    a ``rosbag2_bagfile_information`` mapping in it; anything else is named here, before the
    bag reader looks inside it."""
    meta = bag_p / "metadata.yaml"
    if not (bag_p.is_dir() and meta.is_file()):
        return
    doc = read_yaml_file(meta)
    info = doc.get("rosbag2_bagfile_information") if isinstance(doc, dict) else None
    if not isinstance(info, dict):
        if not isinstance(doc, dict):
            got = type(doc).__name__
        elif "rosbag2_bagfile_information" not in doc:
            got = "no such key"
        else:
            got = f"{type(info).__name__} under that key"
        raise ConfigError(f"import-bag: {meta} is not a rosbag2 metadata mapping (expected a mapping with a "
                          f"'rosbag2_bagfile_information' mapping, as ros2 bag record writes it; found {got}); "
                          "give the folder of a ROS 2 bag, or restore its metadata.yaml")


def _plan(bag: Bag, topics: dict[str, Topic]) -> tuple[list[tuple[str, str, str, dict]], list[str]]:
    streams: list[tuple[str, str, str, dict]] = []
    skipped: list[str] = []
    ids: set[str] = set()
    info_topics = [t.name for t in topics.values() if t.msgtype == AUDIO_INFO]
    for t in sorted(topics.values(), key=lambda t: t.name):
        short = t.msgtype.replace("/msg/", "/")
        if t.msgtype == AUDIO_INFO:
            skipped.append(f"{t.name} ({short}): read as the audio streams' info_topic")
            continue
        if t.msgtype not in SUPPORTED:
            skipped.append(f"{t.name} ({short}): message type not supported")
            continue
        first = bag.first(t.name)
        modality = guess_modality(t.name, t.msgtype, first)
        if modality is None:
            why = "no readable message" if first is None else f"encoding {encoding_of(t.msgtype, first)!r} not supported"
            skipped.append(f"{t.name} ({short}): {why}")
            continue
        extra: dict = {}
        if t.msgtype in AUDIO_TYPES:
            if len(info_topics) != 1:
                skipped.append(f"{t.name} ({short}): PCM layout unknown (no single AudioInfo topic); add it by hand "
                               f"with sample_rate, channels and sample_format")
                continue
            extra["info_topic"] = info_topics[0]
        sid = _stream_id(t.name, ids)
        ids.add(sid)
        streams.append((sid, t.name, modality, extra))
    return streams, skipped


def _stream_id(topic: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", topic).strip("_.-")[:120] or "topic"
    if not base[0].isalnum():
        base = "t" + base
    sid, n = base, 2
    while sid in taken:
        sid, n = f"{base}_{n}", n + 1
    return sid


def _name(bag_p: Path) -> str:
    stem = bag_p.stem if bag_p.is_file() else bag_p.name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-")[:128]
    return base if base and base[0].isalnum() else f"bag{('_' + base) if base else ''}"[:128]


def _reference(bag_p: Path, out: Path) -> str:
    """The recording as a path relative to the session folder: where it is, or hard-linked in."""
    real = bag_p.resolve()
    root = out.resolve()
    if real.is_relative_to(root):
        return real.relative_to(root).as_posix()
    link = root / real.name
    if link.exists():
        raise ConfigError(f"import-bag: {link} exists and is not {real}; choose another --out folder")
    try:
        if real.is_dir():
            link.mkdir()
            for f in real.iterdir():
                if f.is_file():
                    os.link(f, link / f.name)
        else:
            os.link(real, link)
    except OSError as e:
        raise ConfigError(f"import-bag: cannot hard-link {real} into {root} ({e.strerror or e}); a session reads only "
                          f"files inside its folder, so choose an --out folder that holds the recording (e.g. "
                          f"{real.parent}) or one on the same file system") from None
    return link.name
