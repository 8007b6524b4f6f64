"""The bag stream kind of session format v1: its keys, and the checks made at session load.

A stream whose ``source`` is a ROS recording (``.bag``, ``.mcap``, a ROS 2 bag folder) reads one
``topic`` of it. At load the recording is opened and listed: a missing topic, a message type or
encoding the stream's modality does not take, or audio whose PCM layout nobody states is a
:class:`ConfigError` before anything runs (docs/session-format.md, "Bag streams").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sources.bagfile import Bag, BagError, bag_kind
from sources.bagmsgs import AUDIO_INFO, PCM_FORMATS, encoding_problem
from sources.errors import ConfigError
from sources.yamlfile import short

__all__ = ["STAMPS", "bag_keys", "is_bag_stream", "parse_bag_stream"]

STAMPS = ("header", "log")
_BAG_KEYS = frozenset({"topic", "timestamps"})
_AUDIO_KEYS = frozenset({"sample_rate", "channels", "sample_format", "coding", "info_topic"})
_CODINGS = ("pcm", "mp3")


def bag_keys(modality: str) -> frozenset[str]:
    """The keys a bag stream of ``modality`` takes besides id, modality, source, offset."""
    return _BAG_KEYS | (_AUDIO_KEYS if modality == "audio" else frozenset())


def is_bag_stream(raw: Mapping, root: Path) -> bool:
    """A stream with a ``topic``, or whose ``source`` names a ROS recording."""
    src = raw.get("source")
    return "topic" in raw or (isinstance(src, str) and "\x00" not in src and bag_kind(root / src) is not None)


def parse_bag_stream(raw: Mapping, modality: str, source: Path, at: str) -> dict[str, Any]:
    """``StreamSpec`` keyword arguments of a bag stream (``topic``, ``stamp``, ``options``),
    after checking the recording holds the topic in a form ``modality`` takes."""
    if bag_kind(source) is None:
        raise ConfigError(f"{at}: key 'source': a stream with 'topic' reads a ROS recording (a .bag file, a .mcap "
                          f"file or a ROS 2 bag folder holding metadata.yaml), got {source.name}")
    topic = raw.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ConfigError(f"{at}: key 'topic' is missing or not a topic name (a bag stream needs it), got {short(topic)}")
    stamp = raw.get("timestamps", "header")
    if stamp not in STAMPS:
        raise ConfigError(f"{at}: key 'timestamps': expected one of {', '.join(STAMPS)}, got {short(stamp)}")
    try:
        bag = Bag(source)
        topics = bag.topics()
    except BagError as e:
        raise ConfigError(f"{at}: key 'source': {e}") from None
    if topic not in topics:
        raise ConfigError(f"{at}: key 'topic': {source.name} has no topic {topic!r}; its topics: "
                          + ", ".join(f"{t.name} ({t.msgtype.replace('/msg/', '/')})" for t in topics.values()))
    msgtype = topics[topic].msgtype
    problem = encoding_problem(modality, msgtype, None)
    if problem is None:
        problem = encoding_problem(modality, msgtype, bag.first(topic))
    if problem:
        raise ConfigError(f"{at}: topic {topic!r}: {problem}")
    options = _audio_options(raw, bag, topics, at) if modality == "audio" else ()
    return {"topic": topic, "stamp": stamp, "options": options}


def _audio_options(raw: Mapping, bag: Bag, topics: dict, at: str) -> tuple[tuple[str, Any], ...]:
    """coding, and for PCM the rate, channels and sample format: from the stream's keys, else
    from the first message of ``info_topic`` (audio_common_msgs/AudioInfo)."""
    got: dict[str, Any] = {}
    info_topic = raw.get("info_topic")
    if info_topic is not None:
        if not isinstance(info_topic, str) or info_topic not in topics:
            raise ConfigError(f"{at}: key 'info_topic': {short(info_topic)} is not a topic of {bag.path.name}")
        if topics[info_topic].msgtype != AUDIO_INFO:
            raise ConfigError(f"{at}: key 'info_topic': {info_topic} carries {topics[info_topic].msgtype}, "
                              f"not audio_common_msgs/AudioInfo")
        info = bag.first(info_topic)
        if info is None:
            raise ConfigError(f"{at}: key 'info_topic': {info_topic} holds no readable message")
        coding = str(info.coding_format).lower()
        got = {"sample_rate": int(info.sample_rate), "channels": int(info.channels),
               "sample_format": str(info.sample_format).lower(), "coding": "mp3" if coding == "mp3" else "pcm"}
    for key in ("sample_rate", "channels"):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{at}: key '{key}': expected an integer > 0, got {short(v)}")
            got[key] = v
    for key, allowed in (("sample_format", tuple(PCM_FORMATS)), ("coding", _CODINGS)):
        if key in raw:
            if raw[key] not in allowed:
                raise ConfigError(f"{at}: key '{key}': expected one of {', '.join(allowed)}, got {short(raw[key])}")
            got[key] = raw[key]
    got.setdefault("coding", "pcm")
    if got["coding"] == "pcm":
        missing = [k for k in ("sample_rate", "channels", "sample_format") if k not in got]
        if missing:
            raise ConfigError(f"{at}: PCM audio needs {', '.join(missing)} (give the keys, or 'info_topic' naming an "
                              f"AudioInfo topic)")
        if got["sample_format"] not in PCM_FORMATS:
            raise ConfigError(f"{at}: sample format {short(got['sample_format'])} is not supported "
                              f"(supported: {', '.join(PCM_FORMATS)})")
    return tuple(sorted(got.items()))

