"""The run config: frozen, typed sections, parsed and validated completely before any actor starts.

Each key is a dataclass field below; its default and its one-line meaning (``metadata["help"]``)
live there and nowhere else. ``python -m pipeline config`` prints them as an annotated YAML config
(:func:`pipeline.config_doc.default_config_yaml`), and docs/configuration.md lists them
(:func:`pipeline.config_doc.config_reference_markdown`).

Errors are :class:`ConfigError` naming the key path (``encoders.max_batch``) and what was expected;
the CLI turns them into exit code 2.

Relative paths (``sessions``, including the files of inline sessions, ``demo_session``, ``record``,
a local ``store.uri``) in a config file resolve against the file's folder; given with ``--set``, or to
:func:`parse_config` without ``base_dir``, against the current directory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.align import DEFAULT_SPANS, AlignConfig, ModalitySpan
from pipeline.config_base import _build, _is_number, _key, _number, _positive, _Section, _section
from pipeline.trigger_config import TriggerConfig, build_triggers
from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, MODALITIES
from sources.errors import ConfigError
from sources.yamlfile import load_yaml, read_yaml_file, short

__all__ = ["RunConfig", "ReplayConfig", "WindowConfig", "ModelConfig", "EncodersConfig", "SourcesConfig",
           "PublishConfig", "CurveConfig", "RayConfig", "LiveConfig", "StoreConfig", "InlineSession", "load_config",
           "parse_config", "apply_overrides", "tcp_port_problem", "DEFAULTS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHED_POLICIES = ("drop_oldest", "subsample")
_AUTO_TRUE_FALSE = ("auto", True, False)
_PATH_KEYS = ("sessions", "demo_session", "record", "store", "timeline", "triggers")

log = logging.getLogger(__name__)


# -- window.spans -------------------------------------------------------------------------------

def _span_keys(modality: str) -> tuple[str, ...]:
    if DEFAULT_SPANS[modality].nearest:
        return ("tolerance",)
    return ("span", "frames") if modality == "vision" else ("span",)


def _span_help(modality: str, span: ModalitySpan) -> str:
    if span.nearest:
        return f"the frame nearest the window end, within {span.tolerance:g} s"
    frames = f", {span.frames} frames from it (first and last)" if modality == "vision" else ""
    return f"the last {span.span:g} s before the window end{frames}"


def _build_span(modality: str, spec: Any, key: str) -> ModalitySpan:
    base = DEFAULT_SPANS[modality]
    if spec is None:
        return base
    if not isinstance(spec, Mapping):
        raise ConfigError(f"config key '{key}': expected a mapping, got {type(spec).__name__}")
    keys = _span_keys(modality)
    values = {}
    for k, v in spec.items():
        if k not in keys:
            raise ConfigError(f"unknown config key '{key}.{k}' (known here: {', '.join(sorted(keys))})")
        values[k] = _number(v, f"{key}.{k}", integer=k == "frames")
    span = dataclasses.replace(base, **values)
    if span.nearest:
        _positive(span.tolerance, f"{key}.tolerance", allow_zero=True)
    else:
        _positive(span.span, f"{key}.span")
    return span


def _build_spans(given: Any, key: str) -> dict[str, ModalitySpan]:
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"config key '{key}': expected a mapping, got {type(given).__name__}")
    spans = dict(DEFAULT_SPANS)
    for m, spec in given.items():
        if m not in DEFAULT_SPANS:
            raise ConfigError(f"unknown config key '{key}.{m}' (known here: {', '.join(sorted(DEFAULT_SPANS))})")
        spans[m] = _build_span(m, spec, f"{key}.{m}")
    return spans


# -- the sections ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayConfig(_Section):
    _path = "replay"
    rate: float = _key(1.0, "1.0 = real time, 2.0 = twice as fast, 0 = as fast as possible", minimum="non-negative")
    chunk_seconds: float = _key(0.5, "stream time per source chunk (one Ray call); paced replay also cuts one where a window ends",
                                minimum="positive")
    max_inflight_chunks: int = _key(4, "per source: pushes outstanding before the reader waits (backpressure)",
                                    minimum="positive")


@dataclass(frozen=True)
class WindowConfig(_Section):
    _path = "window"
    hop: float = _key(1.0, "seconds between window ends; window k ends at origin + (k+1)*hop", minimum="positive")
    origin: float | str = _key("auto", "auto = earliest first timestamp of any stream; or seconds", loose=True)
    allowed_lateness: float = _key(0.0, "seconds a sample may arrive behind its stream's newest and be re-sorted",
                                   minimum="non-negative")
    release: str = _key("stream", "stream: each stream's part of a window as soon as it is complete; window: whole windows",
                        choices=("stream", "window"), expected="'stream' or 'window'")
    stagger: bool = _key(True, "N sessions: the k-th ends its windows k/N of a hop after the first's, not all in one "
                               "instant (replay: its clock starts later, same embeddings; live: its grid); false = together")
    spans: Mapping[str, ModalitySpan] = _key(
        help="what each modality takes, ending at the window end (ImageBind's training spans)",
        factory=lambda: dict(DEFAULT_SPANS), loose=True, build=_build_spans)

    def _check(self) -> None:
        o = self.origin
        if o != "auto" and not _is_number(o):
            raise ConfigError(f"config key 'window.origin': expected 'auto' or seconds, got {short(o)}")
        if o != "auto":
            object.__setattr__(self, "origin", float(o))

    def align(self) -> AlignConfig:
        return AlignConfig(hop=self.hop, origin=None if self.origin == "auto" else self.origin,
                           allowed_lateness=self.allowed_lateness, spans=dict(self.spans), release=self.release)


@dataclass(frozen=True)
class ModelConfig(_Section):
    _path = "model"
    config: str = _key("imagebind_huge", "imagebind_huge | imagebind_tiny | path to a JSON of reference ImageBindModel kwargs",
                       loose=True)
    checkpoint: str = _key("auto", "auto (cache, else download) | none (seeded random weights) | path .pth/.safetensors")
    precision: str = _key("auto", "auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | fp16", choices=PRECISIONS,
                           expected=f"one of {', '.join(PRECISIONS)}")
    device: str = _key("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    compile: bool = _key(False, "torch.compile the trunks")
    threads: int = _key(0, "torch CPU threads per encoder actor; 0 = torch's default", minimum="non-negative")
    seed: int = _key(0, "seed of the random weights when checkpoint: none")

    def _check(self) -> None:
        if not isinstance(self.config, str):
            raise ConfigError("config key 'model.config': expected a registry name or a path to a reference kwargs JSON")
        if not -(1 << 63) <= self.seed < (1 << 64):
            raise ConfigError(f"config key 'model.seed': expected an integer that fits in 64 bits (-2**63 to "
                              f"2**64 - 1), got {short(self.seed)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"config key 'model.device': expected auto, cpu or cuda[:N], got {short(self.device)}")


@dataclass(frozen=True)
class EncodersConfig(_Section):
    _path = "encoders"
    replicas: int = _key(1, "encoder actors (each holds a model; least-loaded dispatch)", minimum="positive")
    max_batch: int = _key(32, "items per forward, per tower", minimum="positive")
    max_wait_ms: float = _key(20.0, "how long a batch waits for more items after its first", minimum="non-negative")
    num_gpus: float | str = _key("auto", "GPUs per encoder actor: auto = 1 when the device is cuda, else 0", loose=True)
    max_inflight_windows: int = _key(64, "per session: releases between release and publish before sources wait",
                                     minimum="positive")
    coalesce_ms: float = _key(4.0, "replay: a session's releases within this many ms share one encoder call (0 = each at once)",
                              minimum="non-negative")
    prepare_ahead: str | bool = _key("auto", "preprocess the next batch while the model runs this one "
                                     "(auto = on a GPU, or on a CPU when the encoder's torch threads leave a core free)",
                                     choices=_AUTO_TRUE_FALSE, expected="auto, true or false")

    def _check(self) -> None:
        n = self.num_gpus
        if n != "auto" and not (_is_number(n) and n >= 0):
            raise ConfigError(f"config key 'encoders.num_gpus': expected 'auto' or a number, got {short(n)}")


@dataclass(frozen=True)
class SourcesConfig(_Section):
    _path = "sources"
    video_size: int = _key(DEFAULT_VIDEO_SIZE, "frames are decoded straight to this short side", minimum="positive")
    max_pixels: int = _key(DEFAULT_MAX_PIXELS, "refuse video and PNG frames larger than this (pixels) before decoding",
                           minimum="positive")
    max_gap_s: float = _key(60.0, "a sample this far (s) from its stream's newest is a clock jump: dropped, counted; 0 = off",
                            minimum="non-negative")
    select_frames: bool = _key(True, "scale / decode only the frames some window picks (same embeddings); false = every frame")


@dataclass(frozen=True)
class CurveConfig(_Section):
    _path = "publish.curve"
    server_secret_key: str | None = _key(None, "e.g. keys/server.key_secret; null = no encryption", types=(str,))
    authorized_clients: str | None = _key(None, "e.g. keys/authorized_clients: folder of subscriber public *.key files",
                                          types=(str,))

    def _check(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        if given and len(given) != len(fields(self)):
            missing = sorted({f.name for f in fields(self)} - set(given))[0]
            raise ConfigError(f"config key 'publish.curve.{missing}': required when publish.curve.{given[0]} is set")


@dataclass(frozen=True)
class PublishConfig(_Section):
    _path = "publish"
    endpoint: str = _key("tcp://127.0.0.1:5555", "bound by the publisher (port * = any free port); loopback unless changed")
    wait_for_subscribers: int = _key(0, "replay waits for this many subscribers before sending anything",
                                     minimum="non-negative")
    wait_timeout_s: float = _key(60.0, "...for at most this long (then exit 6, nothing published)", minimum="non-negative")
    hwm: int = _key(1000, "ZeroMQ send high-water mark per subscriber", minimum="positive")
    sndbuf: int = _key(0, "OS send buffer per subscriber connection in bytes (0 = OS default)", minimum="non-negative")
    heartbeat_s: float = _key(2.0, "seconds between ctl heartbeat messages", minimum="positive")
    curve: CurveConfig = _key(help="CurveZMQ encryption + subscriber allow-list (keys: python -m pipeline keys DIR)",
                              factory=CurveConfig, build=_section(CurveConfig))

    def _check(self) -> None:
        if self.endpoint.split("://", 1)[0] not in ("tcp", "ipc") or "://" not in self.endpoint:
            raise ConfigError("config key 'publish.endpoint': expected a ZeroMQ endpoint like tcp://127.0.0.1:5555 "
                              f"or ipc:///tmp/bindstream.sock, got {short(self.endpoint)}")
        problem = tcp_port_problem(self.endpoint)
        if problem:
            raise ConfigError(f"config key 'publish.endpoint': {problem}")


def tcp_port_problem(endpoint: str, *, bind: bool = True) -> str | None:
    """What is wrong with a ``tcp://`` endpoint's port, or ``None`` (other transports: ``None``).
    ZeroMQ itself would take port 99999 as 34463 (modulo 65536), so the port is checked here.
    ``bind``: the endpoint is bound, where ``*`` (any free port) is a port too."""
    if not endpoint.startswith("tcp://"):
        return None
    _, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if sep and ((bind and port == "*") or (port.isdigit() and 1 <= int(port) <= 65535)):
        return None
    return (f"{short(endpoint)}: expected a port from 1 to 65535" + (" (or * for any free port)" if bind else "")
            + " after the last ':'")


_RESOURCES = "Ray custom resources (e.g. {camera_node: 1}) "


@dataclass(frozen=True)
class RayConfig(_Section):
    _path = "ray"
    address: str | None = _key(None, "null = start Ray here; \"auto\" or \"ray://host:10001\" = join a cluster", types=(str,))
    num_cpus: int | None = _key(None, "CPUs Ray may use when it starts here; null = all", types=(int,))
    source_resources: dict | None = _key(None, _RESOURCES + "source actors need (near the data); null = anywhere",
                                         types=(dict,))
    encoder_resources: dict | None = _key(None, _RESOURCES + "encoder actors need (GPU nodes); null = anywhere",
                                          types=(dict,))
    publisher_resources: dict | None = _key(None, _RESOURCES + "the publisher needs (where subscribers connect)",
                                            types=(dict,))
    max_inline_bytes: int = _key(4 * 1024 * 1024, "Ray started here: call arguments up to this size skip the object store",
                                 minimum="positive")

    def _check(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"config key 'ray.num_cpus': expected a positive integer (or null for all), "
                              f"got {short(self.num_cpus)}")
        for key in ("source_resources", "encoder_resources", "publisher_resources"):
            for name, amount in (getattr(self, key) or {}).items():
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"config key 'ray.{key}': resource names must be strings, got {short(name)}")
                if not (_is_number(amount) and amount >= 0):
                    raise ConfigError(f"config key 'ray.{key}.{name}': expected a non-negative number, got {short(amount)}")


@dataclass(frozen=True)
class LiveConfig(_Section):
    _path = "live"
    max_latency_s: float = _key(2.0, "publish latency bound (s, from sample arrival); windows beyond it are shed; 0 = none",
                                minimum="non-negative")
    shed: str = _key("drop_oldest", "drop_oldest: whole windows, oldest first | subsample: first thin `subsample`",
                     choices=SHED_POLICIES, expected=f"one of {', '.join(SHED_POLICIES)}")
    subsample: tuple[str, ...] = _key(("vision",), "modalities thinned first under shed: subsample")
    idle_timeout_s: float = _key(2.0, "a live stream this far behind the newest sample stops holding windows; 0 = wait",
                                 minimum="non-negative")
    queue_bytes: int = _key(64 << 20, "byte budget of each live zmq/imagezmq input between its socket and the aligner; "
                            "messages over it are dropped, counted as <stream>:over_budget (stream option queue_bytes)",
                            minimum="positive")

    def _check(self) -> None:
        bad = [m for m in self.subsample if m not in MODALITIES]
        if bad:
            raise ConfigError(f"config key 'live.subsample': expected modalities ({', '.join(MODALITIES)}), got {short(bad[0])}")


@dataclass(frozen=True)
class StoreConfig(_Section):
    _path = "store"
    uri: str | None = _key(None, "keep every published embedding in a LanceDB store here (a folder, relative to this file, or "
                                 "an object-storage URI); null = off (docs/store.md)", types=(str,))
    batch_rows: int = _key(1024, "rows per write; fewer are written once the oldest waited flush_s", minimum="positive")
    flush_s: float = _key(1.0, "seconds a row waits at most before it is written", minimum="positive")
    max_pending_rows: int = _key(100_000, "rows waiting for the disk beyond this are not written (the store fails, "
                                          "publishing goes on)", minimum="positive")
    optimize_every_s: float = _key(60.0, "seconds between index updates and compaction of small fragments in a long run",
                                   minimum="positive")
    ann_min_rows: int = _key(100_000, "rows from which a vector index is built (below: exact search)", minimum="positive")
    thumbnails: bool = _key(False, "also keep a small JPEG of every vision window (the store's thumbnails table)")

    def _check(self) -> None:
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("config key 'store.uri': expected a folder or URI, or null for no store")

    @property
    def local(self) -> bool:
        """Whether ``uri`` is a local path (resolved against the config's folder)."""
        return self.uri is not None and "://" not in self.uri


@dataclass(frozen=True)
class InlineSession:
    """A session given in the config itself (``sessions:`` entry that is a mapping)."""

    doc: Mapping[str, Any]
    root: Path  # the folder its relative paths resolve against


def _session_entry(entry: Any, i: int) -> Path | InlineSession:
    if isinstance(entry, (Path, InlineSession)):
        return entry
    if isinstance(entry, str) and entry.strip():
        return Path(entry)
    if isinstance(entry, Mapping):
        return InlineSession(dict(entry), Path("."))
    raise ConfigError(f"config key 'sessions[{i}]': expected a session folder path or an inline session mapping")


@dataclass(frozen=True)
class RunConfig(_Section):
    """The whole run config. ``sessions``: folders (absolute paths) or inline sessions."""

    sessions: tuple[Path | InlineSession, ...] = _key(
        (), "required: session folders (docs/session-format.md) or inline sessions, relative to this file",
        loose=True, example=["sessions/demo-ego"])
    demo_session: Path | None = _key(None, "if set and the folder has no session.yaml, the synthetic demo is written there",
                                     types=(str, Path))
    replay: ReplayConfig = _key(help="pacing and chunking of recorded sessions", factory=ReplayConfig,
                                build=_section(ReplayConfig))
    window: WindowConfig = _key(help="the window rule (docs/alignment.md)", factory=WindowConfig, build=_section(WindowConfig))
    model: ModelConfig = _key(help="the model every encoder actor holds", factory=ModelConfig, build=_section(ModelConfig))
    encoders: EncodersConfig = _key(help="encoder actors and batching", factory=EncodersConfig, build=_section(EncodersConfig))
    sources: SourcesConfig = _key(help="reading recorded and live streams", factory=SourcesConfig,
                                  build=_section(SourcesConfig))
    publish: PublishConfig = _key(help="the publisher (wire format: docs/protocol.md)", factory=PublishConfig,
                                  build=_section(PublishConfig))
    ray: RayConfig = _key(help="Ray start-up and placement on a cluster (docs/deploy.md)", factory=RayConfig,
                          build=_section(RayConfig))
    progress: str | bool = _key("auto", "progress bar per session: auto (on a terminal), true, false",
                                choices=_AUTO_TRUE_FALSE, expected="auto, true or false")
    stop_after: float | None = _key(None, "live: seconds after which the run stops by itself; null = until Ctrl-C/SIGTERM",
                                    types=(float, int))
    record: Path | None = _key(None, "live: write what live sources produced as session folders DIR/<session>/; null = off",
                               types=(str, Path))
    live: LiveConfig = _key(help="live sessions (docs/live.md): bounded latency when the encoders fall behind",
                            factory=LiveConfig, build=_section(LiveConfig))
    store: StoreConfig = _key(help="the embedding store: every published embedding kept and searchable (docs/store.md)",
                              factory=StoreConfig, build=_section(StoreConfig))
    triggers: tuple[TriggerConfig, ...] = _key((), "prompts that become events on evt/<session>/<name> (docs/triggers.md)",
                                               loose=True, build=build_triggers, item=TriggerConfig)
    timeline: Path | None = _key(None, "at the end of the run, write the session timeline (one HTML file) here; null = off",
                                 types=(str, Path))

    def _check(self) -> None:
        if not isinstance(self.sessions, (list, tuple)):
            raise ConfigError(f"config key 'sessions': expected a list, got {short(self.sessions)}")
        object.__setattr__(self, "sessions", tuple(_session_entry(e, i) for i, e in enumerate(self.sessions)))
        stop = self.stop_after
        if stop is not None and not (stop > 0 and math.isfinite(stop)):
            raise ConfigError(f"config key 'stop_after': expected a positive number of seconds, got {short(stop)}")
        for key in ("demo_session", "record", "timeline"):
            value = getattr(self, key)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"config key '{key}': expected a {'file' if key == 'timeline' else 'folder'} path")
            if value is not None:
                object.__setattr__(self, key, Path(value))

    # Shortcuts to the values most consumers read.
    @property
    def rate(self) -> float:
        return self.replay.rate

    @property
    def chunk_seconds(self) -> float:
        return self.replay.chunk_seconds

    @property
    def max_inflight_chunks(self) -> int:
        return self.replay.max_inflight_chunks

    @property
    def align(self) -> AlignConfig:
        return self.window.align()


# -- loading ----------------------------------------------------------------------------------------

def _absolute(base: Path, p: Path) -> Path:
    """``p`` against ``base``, normalised without touching the file system."""
    return Path(os.path.abspath(base / p))


def _resolve_paths(cfg: RunConfig, base_dir: Path | None, cwd_keys: Collection[str]) -> RunConfig:
    def base(key: str) -> Path:
        return Path.cwd() if base_dir is None or key in cwd_keys else Path(os.path.abspath(base_dir))

    root = base("sessions")
    sessions = tuple(_absolute(root, s) if isinstance(s, Path) else InlineSession(s.doc, _absolute(root, s.root))
                     for s in cfg.sessions)
    paths = {k: _absolute(base(k), getattr(cfg, k)) for k in ("demo_session", "record", "timeline")
             if getattr(cfg, k) is not None}
    if cfg.store.local:
        paths["store"] = dataclasses.replace(cfg.store, uri=str(_absolute(base("store"), Path(cfg.store.uri))))
    triggers = tuple(t.resolved(base("triggers")) for t in cfg.triggers)
    return dataclasses.replace(cfg, sessions=sessions, triggers=triggers, **paths)


def _check_towers(cfg: RunConfig) -> None:
    """What the windows and sources deliver against what the model's towers take (their
    preprocessing contracts, ``encoders.config``; docs/preprocessing.md)."""
    from encoders.config import get_config

    try:
        model = get_config(cfg.model.config)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'model.config': {str(exc).strip(chr(39))}") from None
    spans, vision, audio = cfg.window.spans, model.vision.preprocess, model.audio.preprocess
    if spans["vision"].frames != vision.frames:
        raise ConfigError(f"config key 'window.spans.vision.frames': the vision tower of {model.name} takes exactly "
                          f"{vision.frames} frames, got {spans['vision'].frames}")
    if spans["audio"].span > audio.clip_duration_s:
        raise ConfigError(f"config key 'window.spans.audio.span': the audio tower of {model.name} takes clips of at "
                          f"most {audio.clip_duration_s:g} s ({audio.target_frames} frames), got "
                          f"{spans['audio'].span:g}; a longer window would lose its newest audio")
    if cfg.sources.video_size < vision.size:
        raise ConfigError(f"config key 'sources.video_size': the vision tower of {model.name} takes {vision.size}x"
                          f"{vision.size} crops, got {cfg.sources.video_size}: smaller frames would be scaled back up")
    if spans["imu"].span != model.imu.preprocess.duration_s:
        log.warning("window.spans.imu.span is %g s: each IMU window is resampled into the %d samples the tower of %s "
                    "was trained to read as %g s (docs/preprocessing.md)", spans["imu"].span,
                    model.imu.preprocess.samples, model.name, model.imu.preprocess.duration_s)


def parse_config(data: Any, source: str = "config", *, base_dir: str | Path | None = None,
                 cwd_keys: Collection[str] = ()) -> RunConfig:
    """Validate config data (a parsed YAML mapping) into a :class:`RunConfig`.

    Relative paths resolve against ``base_dir`` (the config file's folder), or the current
    directory where ``base_dir`` is ``None`` and for the top-level keys in ``cwd_keys`` (those
    given on the command line)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    cfg = _build(RunConfig, data, "")
    if not cfg.sessions:
        raise ConfigError(f"{source}: 'sessions' must list at least one session folder")
    _check_towers(cfg)
    return _resolve_paths(cfg, Path(base_dir) if base_dir is not None else None, cwd_keys)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config file at ``path`` with ``--set`` ``overrides`` applied, validated."""
    path = Path(path)
    data = read_yaml_file(path)  # size, depth, aliases, duplicate keys and encoding checked
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    overrides = overrides or []
    apply_overrides(data, overrides)
    cwd_keys = {item.partition("=")[0].strip().split(".")[0] for item in overrides}
    return parse_config(data, source=str(path), base_dir=path.parent, cwd_keys=cwd_keys & set(_PATH_KEYS))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``key.path=value`` overrides in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {short(item)}: expected key.path=value")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a mapping")
            node = nxt
        node[parts[-1]] = load_yaml(value, f"--set {key}", max_bytes=64 << 10)


# -- the table of defaults, as data, YAML and Markdown ------------------------------------------------

def _plain(value: Any) -> Any:
    """A default as YAML data: sections and spans as mappings, tuples as lists."""
    if isinstance(value, _Section):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: {n: getattr(v, n) for n in _span_keys(k)} if isinstance(v, ModalitySpan) else _plain(v)
                for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


DEFAULTS: dict[str, Any] = _plain(RunConfig())
"""The default of every key as plain data (derived from the dataclasses above)."""
