"""The runtime: validate everything, build the Ray graph from the config, run it, summarise.

Order matters for users: every config and session error is raised (exit 2) before Ray starts,
and the model weights are resolved (downloaded once) before any encoder actor is created, so an
offline machine fails fast with a message that says what to do.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.preflight import check_local_placement, check_timeline_path
from pipeline.storage import store_options, store_results
from pipeline.trigger_setup import embed_prompts, load_prompts, write_timeline
from pipeline.run_loop import SourceWatch, error_line, replay_starts, session_align, stagger_phases, wait_sessions
from pipeline.watchdog import Watchdog
from sources.errors import ConfigError
from sources.session import SessionSpec, load_session, session_from_dict

__all__ = ["PUBLISHER_MAX_RESTARTS", "EndpointInUse", "NoSubscriber", "RunResult", "check_endpoint_free", "curve_server_config",
           "prepare_sessions", "ray_init_kwargs", "ray_system_config", "resolve_model_options", "run"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_STREAM_FAILED = 0, 2, 3
EXIT_OUTPUT_FAILED = 5  # every stream ran, but an output (a recording, the store, a timeline page) could not be written
EXIT_NO_SUBSCRIBER = 6  # publish.wait_for_subscribers: none came in time, nothing was published
EXIT_INTERRUPTED = 130  # a replay stopped by Ctrl-C/SIGTERM before its end (128 + SIGINT, as shells do)
PUBLISHER_MAX_RESTARTS = 2  # Ray restarts of the publisher actor (docs/guarantees.md)


@dataclass
class RunResult:
    sessions: list[dict[str, Any]]  # per session: pipeline.stats.SessionResult.to_dict()
    endpoint: str
    model: dict[str, Any]
    elapsed_s: float
    encoder_stats: list[dict[str, Any]] = field(default_factory=list)
    # What each stream's reader returned (stream, chunks, samples, error, dropped, cpu_s, wall_s, node_id, pid,
    # cpu_split: decode/resize/other seconds, see pipeline.metrics.source_cpu_split; frames_skipped:
    # frames left out by frame selection, docs/alignment.md; unpaced_from: the stream time from
    # which paced text stopped waiting, pipeline.reader.StreamReader.run).
    source_stats: list[dict[str, Any]] = field(default_factory=list)
    # The publisher's stats() just before close: next_seq, published, dropped (topic -> live-mode
    # ``hwm`` drops), endpoint, mode, subscriptions. After a publisher restart: the last incarnation's.
    publisher_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if any(s["errors"] for s in self.sessions):
            return EXIT_STREAM_FAILED
        if any(s.get("interrupted") for s in self.sessions):
            return EXIT_INTERRUPTED
        outputs = ("recording_error", "store_error", "timeline_error")
        return EXIT_OUTPUT_FAILED if any(s.get(k) for s in self.sessions for k in outputs) else EXIT_OK


def prepare_sessions(cfg: RunConfig) -> list[SessionSpec]:
    """Load and validate every session (writing the demo session first if configured)."""
    if cfg.demo_session is not None and not (cfg.demo_session / "session.yaml").exists():
        from sources.demo import write_demo_session

        log.info("writing the demo session to %s (first run)", cfg.demo_session)
        try:
            write_demo_session(cfg.demo_session)
        except OSError as exc:
            raise ConfigError(f"config key 'demo_session': cannot write the demo session into {cfg.demo_session}: "
                              f"{exc.strerror or exc}; point it at a folder you can write") from exc
    specs: list[SessionSpec] = []
    for entry in cfg.sessions:
        if isinstance(entry, Path):
            specs.append(load_session(entry))
        else:
            specs.append(session_from_dict(entry.doc, entry.root))
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"config key 'sessions': session name(s) used twice: {', '.join(sorted(dup))}")
    return specs


def _resolved_precision(precision: str, device: str) -> str:
    """``model.precision`` for ``device``: ``auto`` is bf16 on a GPU and fp32 on a CPU, where
    bf16 arithmetic is fast only on cores with bf16 matrix units (on the project's 2-core CPU,
    without them, imagebind_tiny's towers ran 4 to 18 times slower in bf16 than in fp32:
    bench/RESULTS.md); any other setting as it is."""
    if precision != "auto":
        return precision
    return "fp32" if str(device).startswith("cpu") else "bf16"


def resolve_model_options(cfg: RunConfig, specs: list[SessionSpec] = ()) -> dict[str, Any]:
    """Model options for the encoder actors: device chosen, checkpoint resolved to a path; every
    modality of ``specs`` checked against the model's towers."""
    import torch

    from encoders.config import get_config

    m = cfg.model.as_dict()
    config = m["config"]
    if isinstance(config, str) and (config.endswith(".json") or "/" in config):
        import json

        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config key 'model.config': cannot read reference kwargs JSON {path}: {exc}") from None
    try:
        towers = get_config(config).towers
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'model.config': {exc}") from None
    m["config"] = config
    for spec in specs:
        unsupported = sorted({s.modality for s in spec.streams} - set(towers))
        if unsupported:
            raise ConfigError(f"session '{spec.name}': model has no tower for {', '.join(unsupported)}")
    if m["device"] == "auto":
        m["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    m["precision"] = _resolved_precision(m["precision"], m["device"])
    if m["device"] == "cpu" and m["precision"] == "fp16":
        log.warning("fp16 on CPU is slow and imprecise; consider model.precision: auto or fp32")
    ckpt = m["checkpoint"]
    if ckpt not in ("none", None):
        from encoders.weights import resolve, verify

        name = config if isinstance(config, str) else "imagebind_huge"
        m["checkpoint"] = str(resolve(ckpt, name=name))
        verify(m["checkpoint"])
    else:
        m["checkpoint"] = "none"
    return m


def ray_system_config(max_inline_bytes: int) -> dict[str, Any]:
    """Ray's ``_system_config`` when bindstream starts Ray (see :func:`ray_init_kwargs`)."""
    return {"max_direct_call_object_size": int(max_inline_bytes)}


def ray_init_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``ray.init`` arguments for ``cfg``: join ``ray.address``, or start Ray here.

    Starting here, calls carry arguments up to ``ray.max_inline_bytes`` inline (Ray's
    ``max_direct_call_object_size``, 100 KiB by default) instead of through the object store:
    the frames of a chunk or a release skip the raylet's create/seal/get round trips, which on a
    loaded 2-core machine cut the aligner's wait for depth/thermal frames by a third (bench/RESULTS.md).
    A cluster's nodes take it from ``RAY_max_direct_call_object_size`` at ``ray start`` (docs/deploy.md).
    """
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
        return kwargs
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    kwargs["_system_config"] = ray_system_config(cfg.ray.max_inline_bytes)
    return kwargs


def cluster_unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``ray.address`` when it names a ``host:port`` (plain or
    ``ray://``), or ``None``. Ray itself would retry such an address for minutes; ``auto`` is
    left to Ray."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return (f"config key 'ray.address': nothing answers at {address} ({exc.strerror or exc}); start the "
                "cluster's head there (`ray start --head`) or leave ray.address unset to start Ray on this machine")
    return None


def _gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ray_init(cfg: RunConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    problem = cluster_unreachable(cfg.ray.address) if cfg.ray.address else None
    if problem:
        raise ConfigError(problem)
    ray.init(**ray_init_kwargs(cfg))
    return True


def _quiet_ray_env(cfg: RunConfig) -> None:
    """Environment for a Ray that says only what matters. Starting Ray here, token
    authentication is set on explicitly (``RAY_AUTH_MODE=token``: what Ray does by default for a
    new local cluster, without its banner about it; a user's ``RAY_AUTH_MODE`` wins; Ray reads it
    as it is imported, so only before that). Output that is not a terminal gets no colour codes in
    the prefixes of the actors' log lines."""
    if not cfg.ray.address and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def run(cfg: RunConfig, *, progress: bool | None = None, on_ready: Any = None) -> RunResult:
    """Run every session of ``cfg`` to the end. ``on_ready(endpoint)`` is called once the
    publisher is bound, before any data flows (tests connect their subscribers there)."""
    _quiet_ray_env(cfg)
    import ray

    specs = prepare_sessions(cfg)
    check_timeline_path(cfg)
    prompts = load_prompts(cfg)  # the triggers' example files: one that does not decode is a config error, before Ray starts
    live = _live_settings(cfg, specs)  # None unless a session is live
    model_opts = resolve_model_options(cfg, specs)
    curve = curve_server_config(cfg)
    if not cfg.ray.address:  # the publisher binds on this host: a port in use is found before Ray starts
        check_endpoint_free(cfg.publish.endpoint)
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):  # Ray starts here: this machine is its node
            check_local_placement(cfg, str(model_opts["device"]), _gpus_here())
    started_ray = _ray_init(cfg)
    # Ends Ray's processes should this process be killed (pipeline/watchdog.py).
    watchdog = Watchdog.start() if started_ray else None
    t0 = time.time()
    actors: list[Any] = []  # every actor of the run, killed at its end
    try:
        # Named (unique per run) so operators and fault tests can find them: ray.get_actor(name).
        uid = uuid.uuid4().hex[:8]
        encoders, info = _start_encoders(cfg, model_opts, uid, actors)
        publisher, endpoint = _start_publisher(cfg, info, live, curve, uid, actors, store_options(cfg, model_opts, info, uid))
        if on_ready is not None:
            on_ready(endpoint)
        _wait_for_subscribers(cfg, publisher, endpoint)
        aligners = _start_sessions(cfg, specs, info, live, encoders, publisher, uid, actors, embed_prompts(prompts, encoders[0]))
        # Every stream ready and every aligner connected before any stream reads. Failures are
        # left to the run calls, which report them per stream.
        starting = [al.source_ready.remote(s.id) for spec, al in zip(specs, aligners) for s in spec.streams]
        starting += [al.connect.remote() for al in aligners]
        ray.wait(starting, num_returns=len(starting), timeout=120)
        done_refs = [al.wait_done.remote() for al in aligners]
        watch = _start_streams(cfg, specs, aligners)
        summaries = wait_sessions(done_refs, aligners, specs, progress, watch=watch,
                          stop_after=cfg.stop_after if live else None, publisher=publisher)
        watch.poll(final=True)
        write_timeline(cfg.timeline, aligners, specs, summaries)
        if live:
            _write_recordings(live, specs, watch.results, summaries)
        enc_stats = ray.get([e.stats.remote() for e in encoders])
        pub_stats = _close_publisher(publisher)
        store_results(summaries, pub_stats.pop("store", None))
        return RunResult(summaries, endpoint, info, time.time() - t0, enc_stats, source_stats=list(watch.results),
                         publisher_stats=pub_stats)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started_ray:
            ray.shutdown()
        if watchdog is not None:
            watchdog.stop()


def _start_encoders(cfg: RunConfig, model_opts: dict[str, Any], uid: str,
                    actors: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """The encoder actors (added to ``actors``), warmed up, and the model's ``info()``."""
    import ray

    from pipeline.actors import EncoderActor

    enc_opts: dict[str, Any] = {}
    num_gpus = cfg.encoders.num_gpus
    if num_gpus == "auto":
        num_gpus = 1 if str(model_opts["device"]).startswith("cuda") else 0
    if num_gpus:
        enc_opts["num_gpus"] = num_gpus
    enc_opts.update(_placement(cfg, "encoder_resources"))
    encoders = [
        EncoderActor.options(name=f"bindstream.encoder.{i}.{uid}", max_restarts=2, max_task_retries=0,
                             **enc_opts).remote(
            model_opts, int(cfg.encoders.max_batch), float(cfg.encoders.max_wait_ms),
            prepare_ahead=cfg.encoders.prepare_ahead,
            imu_span=cfg.align.spans["imu"].span,
        )
        for i in range(int(cfg.encoders.replicas))
    ]
    actors += encoders
    infos = ray.get([e.info.remote() for e in encoders])
    # Each tower's one-off first-call costs are paid here, not by the first windows.
    warm = ray.get([e.warmup.remote() for e in encoders])
    log.info("encoders warmed up in %.2f s (preprocessing ahead of the model: %s)", max(warm),
             "on" if infos[0].get("prepare_ahead") else "off")
    return encoders, infos[0]


def _start_publisher(cfg: RunConfig, info: dict[str, Any], live: dict[str, Any] | None, curve: Any, uid: str,
                     actors: list[Any], store: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The publisher actor (added to ``actors``), bound; and its endpoint."""
    import ray

    from pipeline.actors import PublisherActor

    pub_opts = {
        "endpoint": cfg.publish.endpoint,
        "mode": "live" if live else "replay",
        "wait_for_subscribers": int(cfg.publish.wait_for_subscribers),
        "wait_timeout_s": cfg.publish.wait_timeout_s,
        "hwm": int(cfg.publish.hwm),
        "sndbuf": int(cfg.publish.sndbuf),
        "model_name": info["model"],
        "curve": curve,
    }
    for attempt in range(3):
        # A "*" port is fixed here, so that a restarted publisher binds the same one and
        # subscribers reconnect by themselves. Another process may take it before the
        # publisher binds it: then pick again.
        pub_opts["endpoint"] = _fixed_endpoint(cfg.publish.endpoint)
        publisher = PublisherActor.options(name=f"bindstream.publisher.{uid}" + (f".{attempt}" if attempt else ""),
                                           max_restarts=PUBLISHER_MAX_RESTARTS, max_task_retries=0,
                                           **_placement(cfg, "publisher_resources")).remote(pub_opts, store)
        actors.append(publisher)
        try:
            endpoint = ray.get(publisher.endpoint.remote())
            break
        except ray.exceptions.RayActorError as exc:
            picked = pub_opts["endpoint"] != cfg.publish.endpoint
            if "Address already in use" not in str(exc):
                raise
            if not picked:
                raise EndpointInUse(cfg.publish.endpoint) from None
            if attempt == 2:
                raise
            log.warning("publisher: %s was taken before the publisher bound it; picking another port",
                        pub_opts["endpoint"])
    log.info("publishing on %s (model %s, dim %d, %s %s)", endpoint, info["model"], info["dim"],
             info["device"], info["dtype"])
    return publisher, endpoint


class NoSubscriber(RuntimeError):
    """``publish.wait_for_subscribers`` were not there within ``publish.wait_timeout_s``: nothing
    was published (exit 6); the message says how to start a subscriber or lower the key."""


def _wait_for_subscribers(cfg: RunConfig, publisher: Any, endpoint: str) -> None:
    import ray

    try:
        ray.get(publisher.wait_for_subscribers.remote())
    except TimeoutError:  # Ray's task error is also an instance of its cause
        n = int(cfg.publish.wait_for_subscribers)
        raise NoSubscriber(
            f"no subscriber came within publish.wait_timeout_s ({cfg.publish.wait_timeout_s:g} s): "
            f"publish.wait_for_subscribers={n} subscription(s) wanted on {endpoint}; nothing was published. "
            f"Start one first (python -m pipeline subscribe {endpoint}), or lower the key "
            f"(--set publish.wait_for_subscribers=0 does not wait), or raise publish.wait_timeout_s") from None


def _start_sessions(cfg: RunConfig, specs: list[SessionSpec], info: dict[str, Any], live: dict[str, Any] | None,
                    encoders: list[Any], publisher: Any, uid: str, actors: list[Any], triggers: Any = None) -> list[Any]:
    """One aligner actor per session (added to ``actors``), reading its streams; each session's ``start`` sent first."""
    import ray

    from pipeline.actors import AlignerActor

    src_opts = {
        "chunk_seconds": cfg.chunk_seconds,
        "video_size": int(cfg.sources.video_size),
        "max_pixels": int(cfg.sources.max_pixels),
        "max_gap_s": float(cfg.sources.max_gap_s),
        "select_frames": bool(cfg.sources.select_frames),  # docs/alignment.md
        "align": cfg.align,
    }
    aligners = []
    phases = _phases(cfg, specs)
    for k, spec in enumerate(specs):
        streams = {s.id: s.modality for s in spec.streams}  # towers checked in resolve_model_options
        # start first: its seqs go to the aligner, which resumes a restarted publisher from them.
        start_seqs = ray.get(publisher.start_session.remote(
            spec.name, streams, info["model"], info["dim"]))
        opts = _live_source_options(src_opts, live, spec) if spec.live else src_opts
        # Reading the session's streams, the aligner goes where sources are placed.
        al = AlignerActor.options(name=f"bindstream.aligner.{spec.name}.{uid}",
                                  **_placement(cfg, "source_resources")).remote(
            spec.name, streams, session_align(cfg.align, spec.live, None if phases is None else phases[k]), encoders, publisher,
            max_inflight_windows=int(cfg.encoders.max_inflight_windows),
            coalesce_ms=float(cfg.encoders.coalesce_ms),
            heartbeat_s=float(cfg.publish.heartbeat_s),
            live=live["aligner"] if live and spec.live else None,
            publish_start={"model": info["model"], "dim": int(info["dim"]), "seqs": start_seqs},
            sources=[(s, opts) for s in spec.streams], triggers=triggers,
            store={"thumbnails": bool(cfg.store.thumbnails)} if cfg.store.uri is not None else None,
            per_tower=cfg.rate > 0 or bool(spec.live),  # latency counts: rows tower by tower
        )
        aligners.append(al)
        actors.append(al)
    return aligners


def _phases(cfg: RunConfig, specs: list[SessionSpec]) -> list[float] | None:
    return stagger_phases(len(specs), cfg.window.hop, cfg.window.stagger)


def _start_streams(cfg: RunConfig, specs: list[SessionSpec], aligners: list[Any]) -> "SourceWatch":
    """Start reading every stream; the watch that collects their end stats.

    Paced replay keeps one clock for every stream: each maps its first sample to one wall time,
    however late its run call lands. The lead lets every stream read its first chunks ahead and
    the aligners fix each session's grid before the clock starts, so the first windows do not
    meet the start-up decoding (``StreamReader._paced_pieces``)."""
    lead = min(3.0, 2 * cfg.chunk_seconds / cfg.rate) if cfg.rate > 0 else 0.0
    starts = replay_starts(time.time() + 0.1 + lead, [bool(spec.live) for spec in specs], _phases(cfg, specs), cfg.rate)
    watch = SourceWatch()
    for spec, al, start_at in zip(specs, aligners, starts):
        for s in spec.streams:
            watch.add(al.source_run.remote(s.id, cfg.rate, cfg.max_inflight_chunks, start_at), al, s.id, spec.live)
    return watch


def _fixed_endpoint(endpoint: str) -> str:
    """``endpoint`` with a ``*`` port replaced by a free concrete one, picked once here so that a
    restarted publisher binds the same port and subscribers reconnect to it by themselves. The
    port is free on this (the driver's) host; it is bound again by the publisher at once. Where
    the kernel says which ports it gives outgoing connections (Linux), the port is picked below
    that range (and above Ray's worker ports), so no connection can take it in between."""
    if not endpoint.startswith("tcp://") or not endpoint.endswith(":*"):
        return endpoint
    import zmq

    host = endpoint[len("tcp://") : -len(":*")]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    try:
        for port in _listen_ports():
            try:
                sock.bind(f"tcp://{host}:{port}")
            except zmq.ZMQError:
                continue  # in use
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.bind(endpoint)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except zmq.ZMQError as exc:
        raise OSError(f"publisher: cannot bind {endpoint!r}: {exc}") from exc
    finally:
        sock.close(linger=0)
        ctx.term()


class EndpointInUse(ConfigError):
    """``publish.endpoint`` is bound by another process (exit 2); the message says how to pick another."""

    def __init__(self, endpoint: str) -> None:
        base = endpoint.rsplit(":", 1)[0]
        super().__init__(f"publish.endpoint {endpoint} is in use by another process; pick another with "
                         f"--set publish.endpoint={base}:PORT (or {base}:* for any free port)")


def check_endpoint_free(endpoint: str) -> None:
    """Raise :class:`EndpointInUse` when a ``tcp://`` ``endpoint`` is bound by another process
    now, and :class:`ConfigError` when this host cannot bind it at all (an
    address that is not one of this machine's). The publisher binds it once Ray has started."""
    if not endpoint.startswith("tcp://"):
        return
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            raise EndpointInUse(endpoint) from None
        raise ConfigError(f"config key 'publish.endpoint': cannot bind {endpoint} on this machine ({exc}); "
                          "use one of its addresses: tcp://127.0.0.1:PORT for this machine only, "
                          "tcp://0.0.0.0:PORT for every interface") from None
    finally:
        sock.close(linger=0)
        ctx.term()


def _listen_ports(tries: int = 20) -> list[int]:
    """Candidate ports between Ray's worker ports (10002-19999 by default) and the kernel's
    range for outgoing connections; none where that range is unknown or starts too low."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    first = 20_000
    if low <= first:
        return []
    return random.sample(range(first, low), min(tries, low - first))


def _close_publisher(publisher: Any) -> dict[str, Any]:
    """The publisher's stats, then close it (flushes queued messages). A publisher that is gone
    (restarts exhausted; the sessions already report it) gives empty stats."""
    import ray
    from ray.exceptions import RayActorError

    try:
        stats = ray.get(publisher.stats.remote())
        stats.update(ray.get(publisher.close.remote()) or {})  # the store's reports, once it is closed
        return stats
    except RayActorError as exc:
        log.error("publisher unavailable at the end of the run: %s", error_line(exc))
        return {}


def curve_server_config(cfg: RunConfig) -> Any:
    """The publisher's CurveZMQ identity from ``publish.curve`` (``None`` when unset); unreadable
    or invalid key files are a :class:`ConfigError` naming the key, raised before Ray starts."""
    curve = cfg.publish.curve
    if not curve.server_secret_key:
        return None
    from sinks.keys import CurveServerConfig

    try:
        return CurveServerConfig.from_files(curve.server_secret_key, curve.authorized_clients)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key 'publish.curve': {exc}") from None


# -- live sessions (docs/live.md) ------------------------------------------------------------------
def _live_settings(cfg: RunConfig, specs: list[SessionSpec]) -> dict[str, Any] | None:
    """What live sessions need from the config, or ``None`` for an all-replay run."""
    if not any(s.live for s in specs):
        return None
    live = cfg.live.as_dict()
    live["inflight"] = 2 * int(cfg.encoders.replicas)
    record = cfg.record
    return {"aligner": live, "record": Path(record).resolve() if record else None, "epoch": None}


def _live_source_options(src_opts: dict[str, Any], live: dict[str, Any], spec: SessionSpec) -> dict[str, Any]:
    if live["epoch"] is None:
        live["epoch"] = time.time()  # the session clock's zero: Unix time as the first source starts
        log.info("live session clock epoch %.6f (Unix time)", live["epoch"])
    opts = dict(src_opts, epoch=live["epoch"], queue_bytes=int(live["aligner"]["queue_bytes"]))
    if live["record"] is not None:
        from sources.record import partial_folder

        opts["record_dir"] = str(live.setdefault("partials", {}).setdefault(
            spec.name, partial_folder(live["record"], spec.name)))
    return opts


def _write_recordings(live: dict[str, Any], specs: list[SessionSpec], results: list[dict[str, Any]],
                      summaries: list[dict[str, Any]]) -> None:
    if live["record"] is None:
        return
    from sources.record import RecordingError, finish_recording

    for spec in specs:
        if not spec.live:
            continue
        mine = {r["stream"]: r for r in results if r.get("session") == spec.name}
        entries = [mine[s.id]["record"] for s in spec.streams if mine.get(s.id, {}).get("record")]
        offsets = {sid: r.get("clock_offsets") or [] for sid, r in mine.items()}
        mappings = {sid: r["clock_mapping"] for sid, r in mine.items() if r.get("clock_mapping")}
        failed = [mine[s.id]["record_error"] for s in spec.streams if mine.get(s.id, {}).get("record_error")]
        partial = live.get("partials", {}).get(spec.name)
        summary = next((s for s in summaries if s.get("session") == spec.name), {})
        if partial is None:
            continue
        if failed:
            summary["recording_error"] = f"{failed[0]}; what was written is in {partial}"
            continue
        try:
            folder = finish_recording(partial, spec.name, entries, offsets, mappings)
        except RecordingError as exc:
            summary["recording_error"] = str(exc)
            continue
        if folder is not None:
            log.info("session '%s' recorded to %s", spec.name, folder)
            summary["recording"] = str(folder)


def _placement(cfg: RunConfig, key: str) -> dict[str, Any]:
    """``.options(resources=...)`` for ``ray.<key>`` (custom resources, e.g. ``{"camera_node": 1}``):
    Ray places the actor only on a node that offers them (``ray start --resources``)."""
    res = getattr(cfg.ray, key)
    return {"resources": {str(k): float(v) for k, v in res.items()}} if res else {}


