"""The runtime: validate everything, build the Ray graph from the config, run it, summarise.

Order matters for users: every config and session error is raised (exit 2) before Ray starts,
and the model weights are resolved (downloaded once) before any encoder actor is created, so an
offline machine fails fast with a message that says what to do.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.session import SessionSpec, load_session, session_from_dict

__all__ = ["RunResult", "prepare_sessions", "resolve_model_options", "run"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_STREAM_FAILED = 0, 2, 3


@dataclass
class RunResult:
    sessions: list[dict[str, Any]]
    endpoint: str
    model: dict[str, Any]
    elapsed_s: float
    encoder_stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_STREAM_FAILED if any(s["errors"] for s in self.sessions) else EXIT_OK


def prepare_sessions(cfg: RunConfig) -> list[SessionSpec]:
    """Load and validate every session (writing the demo session first if configured)."""
    if cfg.demo_session is not None and not (cfg.demo_session / "session.yaml").exists():
        from pipeline.demo import write_demo_session

        log.info("writing the demo session to %s (first run)", cfg.demo_session)
        write_demo_session(cfg.demo_session)
    specs: list[SessionSpec] = []
    for i, entry in enumerate(cfg.sessions):
        if isinstance(entry, str):
            specs.append(load_session(Path(entry)))
        else:
            specs.append(session_from_dict(entry, Path.cwd()))
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"config key 'sessions': session name(s) used twice: {', '.join(sorted(dup))}")
    return specs


def resolve_model_options(cfg: RunConfig) -> dict[str, Any]:
    """Model options for the encoder actors: device chosen, checkpoint resolved to a path."""
    import torch

    from encoders.config import get_config

    m = dict(cfg.model)
    config = m["config"]
    if isinstance(config, str) and (config.endswith(".json") or "/" in config):
        import json

        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config key 'model.config': cannot read reference kwargs JSON {path}: {exc}") from None
    try:
        get_config(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'model.config': {exc}") from None
    m["config"] = config
    if m["device"] == "auto":
        m["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if m["device"] == "cpu" and m["precision"] == "fp16":
        log.warning("fp16 on CPU is slow and imprecise; consider model.precision: bf16 or fp32")
    ckpt = m["checkpoint"]
    if ckpt not in ("none", None):
        from encoders.weights import resolve

        name = config if isinstance(config, str) else "imagebind_huge"
        m["checkpoint"] = str(resolve(ckpt, name=name))
    else:
        m["checkpoint"] = "none"
    return m


def _ray_init(cfg: RunConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray.get("address"):
        kwargs["address"] = cfg.ray["address"]
    elif cfg.ray.get("num_cpus"):
        kwargs["num_cpus"] = cfg.ray["num_cpus"]
    ray.init(**kwargs)
    return True


def run(cfg: RunConfig, *, progress: bool | None = None, on_ready: Any = None) -> RunResult:
    """Run every session of ``cfg`` to the end. ``on_ready(endpoint)`` is called once the
    publisher is bound, before any data flows (tests connect their subscribers there)."""
    import ray

    from pipeline.actors import AlignerActor, EncoderActor, PublisherActor, SourceActor

    specs = prepare_sessions(cfg)
    model_opts = resolve_model_options(cfg)
    started_ray = _ray_init(cfg)
    t0 = time.time()
    actors: list[Any] = []
    try:
        enc_opts: dict[str, Any] = {}
        num_gpus = cfg.encoders["num_gpus"]
        if num_gpus == "auto":
            num_gpus = 1 if str(model_opts["device"]).startswith("cuda") else 0
        if num_gpus:
            enc_opts["num_gpus"] = num_gpus
        encoders = [
            EncoderActor.options(max_restarts=2, max_task_retries=0, **enc_opts).remote(
                model_opts, int(cfg.encoders["max_batch"]), float(cfg.encoders["max_wait_ms"])
            )
            for _ in range(int(cfg.encoders["replicas"]))
        ]
        actors += encoders
        infos = ray.get([e.info.remote() for e in encoders])
        info = infos[0]
        pub_opts = {
            "endpoint": cfg.publish["endpoint"],
            "mode": "replay",
            "wait_for_subscribers": int(cfg.publish["wait_for_subscribers"]),
            "wait_timeout_s": cfg.publish["wait_timeout_s"],
            "hwm": int(cfg.publish["hwm"]),
            "model_name": info["model"],
        }
        publisher = PublisherActor.remote(pub_opts)
        actors.append(publisher)
        endpoint = ray.get(publisher.endpoint.remote())
        log.info("publishing on %s (model %s, dim %d, %s %s)", endpoint, info["model"], info["dim"],
                 info["device"], info["dtype"])
        if on_ready is not None:
            on_ready(endpoint)
        ray.get(publisher.wait_for_subscribers.remote())

        aligners, sources, runs = [], [], []
        src_opts = {
            "chunk_seconds": cfg.chunk_seconds,
            "video_size": int(cfg.sources["video_size"]),
            "max_pixels": int(cfg.sources["max_pixels"]),
        }
        for spec in specs:
            streams = {s.id: s.modality for s in spec.streams}
            unsupported = sorted({m for m in streams.values() if m not in info["modalities"]})
            if unsupported:
                raise ConfigError(f"session '{spec.name}': model has no tower for {', '.join(unsupported)}")
            al = AlignerActor.remote(
                spec.name, streams, cfg.align, encoders, publisher,
                max_inflight_windows=int(cfg.encoders["max_inflight_windows"]),
                heartbeat_s=float(cfg.publish["heartbeat_s"]),
            )
            aligners.append(al)
            ray.get(publisher.start_session.remote(
                spec.name, streams, info["model"], info["dim"]))
            for s in spec.streams:
                src = SourceActor.remote(spec.name, s, al, src_opts)
                sources.append(src)
        actors += aligners + sources
        done_refs = [al.wait_done.remote() for al in aligners]
        for src in sources:
            runs.append(src.run.remote(cfg.rate, cfg.max_inflight_chunks))

        summaries = _wait(done_refs, aligners, specs, sources, progress)
        ray.get(runs)
        enc_stats = ray.get([e.stats.remote() for e in encoders])
        ray.get(publisher.close.remote())
        return RunResult(summaries, endpoint, info, time.time() - t0, enc_stats)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started_ray:
            ray.shutdown()


def _wait(done_refs: list[Any], aligners: list[Any], specs: list[SessionSpec], sources: list[Any],
          progress: bool | None) -> list[dict[str, Any]]:
    import ray

    bars = _progress_bars(specs, progress)
    interrupted = {"n": 0}

    def on_signal(signum: int, frame: Any) -> None:
        interrupted["n"] += 1
        if interrupted["n"] >= 2:
            raise KeyboardInterrupt
        log.warning("stopping: draining in-flight windows (press Ctrl-C again to stop at once)")
        for s in sources:
            s.stop.remote()

    old = {}
    if _is_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    try:
        pending = list(done_refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if bars:
                for bar, p in zip(bars, ray.get([a.progress.remote() for a in aligners])):
                    bar.n = p["windows"]
                    bar.set_postfix(published=p["published"], refresh=False)
                    bar.refresh()
        return ray.get(done_refs)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for bar in bars:
            bar.close()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress_bars(specs: list[SessionSpec], progress: bool | None) -> list[Any]:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return []
    from tqdm import tqdm

    return [tqdm(desc=s.name, unit="win", position=i, leave=True) for i, s in enumerate(specs)]
