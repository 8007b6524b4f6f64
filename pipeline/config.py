"""The run config: parsed and validated completely before any actor starts.

Every key is documented in ``configs/demo.yaml``. Errors are :class:`ConfigError` naming the
key path (``encoders.max_batch``) and what was expected; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.align import DEFAULT_SPANS, AlignConfig, ModalitySpan
from sources.errors import ConfigError

__all__ = ["RunConfig", "load_config", "parse_config", "apply_overrides", "DEFAULTS"]

PRECISIONS = ("fp32", "bf16", "fp16")

log = logging.getLogger(__name__)

# The schema is the defaults: a key not in here is unknown. ``None`` means "no default value";
# the type of such a key is given in _TYPES.
DEFAULTS: dict[str, Any] = {
    "sessions": [],
    "demo_session": None,
    "replay": {"rate": 1.0, "chunk_seconds": 0.5, "max_inflight_chunks": 4},
    "window": {
        "hop": 1.0,
        "origin": "auto",
        "allowed_lateness": 0.0,
        "release": "stream",
        "spans": {
            "vision": {"span": 2.0, "frames": 2},
            "audio": {"span": 2.0},
            "imu": {"span": 5.0},
            "depth": {"tolerance": 0.5},
            "thermal": {"tolerance": 0.5},
            "text": {"span": 1.0},
        },
    },
    "model": {
        "config": "imagebind_huge",
        "checkpoint": "auto",
        "precision": "bf16",
        "device": "auto",
        "compile": False,
        "threads": 0,
        "seed": 0,
    },
    "encoders": {"replicas": 1, "max_batch": 32, "max_wait_ms": 20.0, "num_gpus": "auto", "max_inflight_windows": 64,
                 "coalesce_ms": 4.0, "prepare_ahead": "auto"},
    "sources": {"video_size": 224, "max_pixels": 8192 * 8192, "max_gap_s": 60.0, "select_frames": True,
                "process": "session"},
    "publish": {
        "endpoint": "tcp://127.0.0.1:5555",
        "wait_for_subscribers": 0,
        "wait_timeout_s": 60.0,
        "hwm": 1000,
        "sndbuf": 0,  # bytes of OS send buffer per subscriber connection; 0 = the OS default
        "heartbeat_s": 2.0,
        "curve": {"server_secret_key": None, "authorized_clients": None},
    },
    "ray": {"address": None, "num_cpus": None, "source_resources": None, "encoder_resources": None,
            "publisher_resources": None, "max_inline_bytes": 4 * 1024 * 1024},
    "progress": "auto",
    # Live sessions (docs/live.md).
    "stop_after": None,
    "record": None,
    "live": {"max_latency_s": 2.0, "shed": "drop_oldest", "subsample": ["vision"], "idle_timeout_s": 2.0},
}

# Keys that take a word or a value of another type ("auto" or a number, auto/true/false);
# each is checked in parse_config.
_LOOSE = frozenset({"progress", "encoders.num_gpus", "encoders.prepare_ahead", "window.origin"})

_TYPES: dict[str, tuple[type, ...]] = {
    "demo_session": (str,),
    "ray.address": (str,),
    "ray.num_cpus": (int,),
    "ray.source_resources": (dict,),
    "ray.encoder_resources": (dict,),
    "ray.publisher_resources": (dict,),
    "stop_after": (float, int),
    "record": (str,),
    "publish.curve.server_secret_key": (str,),
    "publish.curve.authorized_clients": (str,),
}


@dataclass(frozen=True)
class RunConfig:
    sessions: list[Any]
    demo_session: Path | None
    rate: float
    chunk_seconds: float
    max_inflight_chunks: int
    align: AlignConfig
    model: dict[str, Any]
    encoders: dict[str, Any]
    sources: dict[str, Any]
    publish: dict[str, Any]
    ray: dict[str, Any]
    progress: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: malformed YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    return parse_config(data, source=str(path))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``key.path=value`` overrides in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a mapping")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {value!r}: {exc}") from None


def _merge(defaults: Any, given: Any, path: str) -> Any:
    if isinstance(defaults, dict):
        if given is None:
            return copy.deepcopy(defaults)
        if not isinstance(given, dict):
            raise ConfigError(f"config key '{path}': expected a mapping, got {type(given).__name__}")
        out = copy.deepcopy(defaults)
        for k, v in given.items():
            key = f"{path}.{k}" if path else str(k)
            if k not in defaults:
                known = ", ".join(sorted(defaults))
                raise ConfigError(f"unknown config key '{key}' (known here: {known})")
            out[k] = _merge(defaults[k], v, key)
        return out
    if path in _LOOSE:
        return given
    if given is None and defaults is not None:
        # An empty value (`max_batch:`) or null where the key has a value of its own.
        kind = ("true/false" if isinstance(defaults, bool) else "a number" if isinstance(defaults, (int, float))
                else "a list" if isinstance(defaults, list) else "a string")
        raise ConfigError(f"config key '{path}': expected {kind}, got null (leave the key out for its default)")
    if defaults is None or given is None:
        if given is not None and path in _TYPES and not isinstance(given, _TYPES[path]):
            raise ConfigError(f"config key '{path}': expected {_TYPES[path][0].__name__}, got {given!r}")
        return given
    if isinstance(defaults, bool):
        if not isinstance(given, bool):
            raise ConfigError(f"config key '{path}': expected true/false, got {given!r}")
        return given
    if isinstance(defaults, (int, float)) and not isinstance(defaults, bool):
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given):
            raise ConfigError(f"config key '{path}': expected a number, got {given!r}")
        if isinstance(defaults, int) and not isinstance(given, int):
            raise ConfigError(f"config key '{path}': expected an integer, got {given!r}")
        return given
    if isinstance(defaults, list):
        if not isinstance(given, list):
            raise ConfigError(f"config key '{path}': expected a list, got {given!r}")
        return given
    if isinstance(defaults, str):
        if not isinstance(given, (str, int, float)) or isinstance(given, bool):
            raise ConfigError(f"config key '{path}': expected a string, got {given!r}")
        return given
    return given


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _check_curve(curve: dict[str, Any]) -> None:
    """publish.curve: both keys or neither; the files are loaded (and checked) by the run."""
    given = [k for k, v in curve.items() if v is not None]
    if given and len(given) != len(curve):
        missing = sorted(set(curve) - set(given))[0]
        raise ConfigError(f"config key 'publish.curve.{missing}': required when publish.curve.{given[0]} is set")


SHED_POLICIES = ("drop_oldest", "subsample")


def _check_live(merged: dict[str, Any]) -> None:
    """stop_after, record and live.* (read from ``RunConfig.raw`` by the run; docs/live.md)."""
    stop = merged["stop_after"]
    if stop is not None and (isinstance(stop, bool) or not stop > 0 or not math.isfinite(stop)):
        raise ConfigError(f"config key 'stop_after': expected a positive number of seconds, got {stop!r}")
    if merged["record"] is not None and not str(merged["record"]).strip():
        raise ConfigError("config key 'record': expected a folder path")
    live = merged["live"]
    _positive(live["max_latency_s"], "live.max_latency_s", allow_zero=True)
    _positive(live["idle_timeout_s"], "live.idle_timeout_s", allow_zero=True)
    if live["shed"] not in SHED_POLICIES:
        raise ConfigError(f"config key 'live.shed': expected one of {', '.join(SHED_POLICIES)}, got {live['shed']!r}")
    from sources.base import MODALITIES

    bad = [m for m in live["subsample"] if m not in MODALITIES]
    if bad:
        raise ConfigError(f"config key 'live.subsample': expected modalities ({', '.join(MODALITIES)}), got {bad[0]!r}")


def _check_resources(ray_cfg: dict[str, Any]) -> None:
    """ray.*_resources: Ray custom resources (name -> amount) the actor must be placed on."""
    for key in ("source_resources", "encoder_resources", "publisher_resources"):
        res = ray_cfg.get(key)
        if res is None:
            continue
        for name, amount in res.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"config key 'ray.{key}': resource names must be strings, got {name!r}")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
                raise ConfigError(f"config key 'ray.{key}.{name}': expected a non-negative number, got {amount!r}")


def _check_towers(model_config: str, spans: dict[str, ModalitySpan], sources: dict[str, Any]) -> None:
    """What the windows and sources deliver against what the model's towers take (their
    preprocessing contracts, ``encoders.config``; docs/preprocessing.md)."""
    from encoders.config import get_config

    try:
        cfg = get_config(model_config)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'model.config': {exc}") from None
    vision, audio = cfg.vision.preprocess, cfg.audio.preprocess
    if spans["vision"].frames != vision.frames:
        raise ConfigError(f"config key 'window.spans.vision.frames': the vision tower of {cfg.name} takes exactly "
                          f"{vision.frames} frames, got {spans['vision'].frames}")
    if spans["audio"].span > audio.clip_duration_s:
        raise ConfigError(f"config key 'window.spans.audio.span': the audio tower of {cfg.name} takes clips of at most "
                          f"{audio.clip_duration_s:g} s ({audio.target_frames} frames), got {spans['audio'].span:g}; "
                          "a longer window would lose its newest audio")
    if int(sources["video_size"]) < vision.size:
        raise ConfigError(f"config key 'sources.video_size': the vision tower of {cfg.name} takes {vision.size}x"
                          f"{vision.size} crops, got {sources['video_size']}: smaller frames would be scaled back up")
    if spans["imu"].span != cfg.imu.preprocess.duration_s:
        log.warning("window.spans.imu.span is %g s: each IMU window is resampled into the %d samples the tower of %s "
                    "was trained to read as %g s (docs/preprocessing.md)", spans["imu"].span,
                    cfg.imu.preprocess.samples, cfg.name, cfg.imu.preprocess.duration_s)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    merged = _merge(DEFAULTS, data, "")
    sessions = merged["sessions"]
    if not sessions:
        raise ConfigError(f"{source}: 'sessions' must list at least one session folder")
    for i, s in enumerate(sessions):
        if not isinstance(s, (str, dict)):
            raise ConfigError(f"config key 'sessions[{i}]': expected a session folder path or an inline session mapping")

    rp = merged["replay"]
    _positive(rp["rate"], "replay.rate", allow_zero=True)
    _positive(rp["chunk_seconds"], "replay.chunk_seconds")
    _positive(rp["max_inflight_chunks"], "replay.max_inflight_chunks")

    w = merged["window"]
    _positive(w["hop"], "window.hop")
    _positive(w["allowed_lateness"], "window.allowed_lateness", allow_zero=True)
    origin = w["origin"]
    if origin == "auto":
        origin = None
    elif isinstance(origin, bool) or not isinstance(origin, (int, float)):
        raise ConfigError(f"config key 'window.origin': expected 'auto' or seconds, got {origin!r}")
    spans: dict[str, ModalitySpan] = {}
    for m, spec in w["spans"].items():
        base = DEFAULT_SPANS[m]
        if base.nearest:
            if set(spec) - {"tolerance"}:
                raise ConfigError(f"config key 'window.spans.{m}': only 'tolerance' applies to {m}")
            _positive(spec["tolerance"], f"window.spans.{m}.tolerance", allow_zero=True)
            spans[m] = ModalitySpan(tolerance=float(spec["tolerance"]))
        else:
            if set(spec) - {"span", "frames"} or ("frames" in spec and m != "vision"):
                bad = sorted(set(spec) - {"span"})
                raise ConfigError(f"unknown config key 'window.spans.{m}.{bad[0]}'")
            _positive(spec["span"], f"window.spans.{m}.span")
            frames = int(spec.get("frames", 2))
            spans[m] = ModalitySpan(span=float(spec["span"]), frames=frames)
    if w["release"] not in ("stream", "window"):
        raise ConfigError(f"config key 'window.release': expected 'stream' or 'window', got {w['release']!r}")
    align = AlignConfig(hop=float(w["hop"]), origin=origin, allowed_lateness=float(w["allowed_lateness"]), spans=spans,
                        release=w["release"])

    m = merged["model"]
    if m["precision"] not in PRECISIONS:
        raise ConfigError(f"config key 'model.precision': expected one of {', '.join(PRECISIONS)}, got {m['precision']!r}")
    if not isinstance(m["config"], str):
        raise ConfigError("config key 'model.config': expected a registry name or a path to a reference kwargs JSON")
    dev = str(m["device"])
    if not (dev in ("auto", "cpu") or dev.startswith("cuda")):
        raise ConfigError(f"config key 'model.device': expected auto, cpu or cuda[:N], got {dev!r}")
    _check_towers(m["config"], spans, merged["sources"])

    e = merged["encoders"]
    _positive(e["replicas"], "encoders.replicas")
    _positive(e["max_batch"], "encoders.max_batch")
    _positive(e["max_wait_ms"], "encoders.max_wait_ms", allow_zero=True)
    _positive(e["max_inflight_windows"], "encoders.max_inflight_windows")
    _positive(e["coalesce_ms"], "encoders.coalesce_ms", allow_zero=True)
    if e["prepare_ahead"] not in ("auto", True, False):
        raise ConfigError(f"config key 'encoders.prepare_ahead': expected auto, true or false, got {e['prepare_ahead']!r}")
    if e["num_gpus"] != "auto" and (isinstance(e["num_gpus"], bool) or not isinstance(e["num_gpus"], (int, float))):
        raise ConfigError(f"config key 'encoders.num_gpus': expected 'auto' or a number, got {e['num_gpus']!r}")

    p = merged["publish"]
    if not isinstance(p["endpoint"], str) or "://" not in p["endpoint"]:
        raise ConfigError(f"config key 'publish.endpoint': expected a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {p['endpoint']!r}")
    _positive(p["wait_for_subscribers"], "publish.wait_for_subscribers", allow_zero=True)
    _positive(p["hwm"], "publish.hwm")
    _positive(p["sndbuf"], "publish.sndbuf", allow_zero=True)
    _positive(p["heartbeat_s"], "publish.heartbeat_s")
    _check_curve(p["curve"])
    _positive(merged["sources"]["max_gap_s"], "sources.max_gap_s", allow_zero=True)
    if merged["sources"]["process"] not in ("stream", "session"):
        raise ConfigError(f"config key 'sources.process': expected 'stream' or 'session', got {merged['sources']['process']!r}")
    _check_live(merged)
    _check_resources(merged["ray"])
    _positive(merged["ray"]["max_inline_bytes"], "ray.max_inline_bytes")
    if merged["progress"] not in ("auto", True, False):
        raise ConfigError(f"config key 'progress': expected auto, true or false, got {merged['progress']!r}")

    demo = merged["demo_session"]
    return RunConfig(
        sessions=sessions,
        demo_session=Path(demo) if demo else None,
        rate=float(rp["rate"]),
        chunk_seconds=float(rp["chunk_seconds"]),
        max_inflight_chunks=int(rp["max_inflight_chunks"]),
        align=align,
        model=m,
        encoders=e,
        sources=merged["sources"],
        publish=p,
        ray=merged["ray"],
        progress=merged["progress"],
        raw=merged,
    )
