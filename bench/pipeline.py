"""End-to-end throughput and latency: the Ray graph against one process, the raw encoder and a naive loop.

Workload: N synthetic sessions written deterministically with PyAV (``sources.demo``; by default
1280x720 at 30 fps H.264 at ~2 Mbit/s with an AAC soundtrack, IMU 200 Hz, depth and thermal
10 Hz, captions), windows every 1 s (hop), one clip and one crop per window. Measured in one run:

* ``pipeline``: the full Ray graph (``pipeline.run.run``) at replay rate 0, counted at a real
  ZeroMQ SUB socket;
* ``single_process``: the same decode -> align -> preprocess -> encode -> publish (ZeroMQ) in
  this process without Ray (``pipeline.inprocess.run_inprocess``);
* ``raw_encoder``: the model forward on preprocessed tensors already on the device, same batch
  and precision (the ceiling);
* ``naive``: one window and one modality at a time, batch 1, fp32, full-size decode and the
  reference transforms of ``encoders.compat`` (the floor).

Per stream, CPU core-seconds per second of run (per session): its reader's thread, read-ahead
and FFmpeg threads (``cpu_core_s_per_s_per_stream``), split into decode / resize / other
(``cpu_split_core_s_per_s_per_stream``; decode and resize include FFmpeg's own decoder and
scaler threads, see ``pipeline.metrics.source_cpu_split``); ``cpu_core_s_per_s_total`` counts
every process of the run.

Latency is per embedding, from the newest sample it used entering the pipeline (its chunk being
sent) to its arrival at the subscriber, also split by modality (``latency_by_modality``): audio
and IMU end at the window end, so theirs is the latency beyond the window's span; a caption can
lie up to its 1 s span before the window end, and a video frame's chunk is sent up to
``chunk_seconds`` after the frame, which those modalities' figures include or leave out.
``--realtime`` judges the latency beyond the window's span (``latency_beyond_window``: audio and
IMU) against ``--target-p99``. The sessions' replay clocks start spread over one hop
(``window.stagger``, the default); ``--no-stagger`` starts them together, so every session's
windows end in the same instants. ``--no-select-frames`` turns frame selection off
(docs/alignment.md) in both graph modes.

    python bench/pipeline.py                       # short CPU run (tiny model, 2 sessions x 8 s)
    python bench/pipeline.py --json                # one JSON object on stdout
    python bench/pipeline.py --realtime 3          # also: 3 sessions at rate 1.0, does latency hold?
    python bench/pipeline.py --memory-check        # peak memory, 10-minute vs 1-minute session
    python bench/pipeline.py --model imagebind_huge --device cuda --precision bf16 --max-batch 64

Numbers on a shared machine are noisy; ratios measured in one run are what to compare.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# bench/pipeline.py would shadow the pipeline package, here and in Ray workers (Ray copies the
# script directory to workers only while it is on sys.path): take it off, put the repo root first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import AlignConfig  # noqa: E402
from pipeline.align import DEFAULT_SPANS  # noqa: E402
from pipeline.config import EncodersConfig, RayConfig, WindowConfig  # noqa: E402
from pipeline.metrics import percentiles  # noqa: E402

__all__ = ["main"]

log = logging.getLogger("bench.pipeline")

MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")
_SPLIT_PARTS = ("decode_s", "resize_s", "other_s", "total_s")  # the readers' end stats' cpu_split


# -- workload ---------------------------------------------------------------------------------
def make_sessions(cache: Path, n: int, seconds: float, size: tuple[int, int], fps: int,
                  bitrate: int | None) -> list[Path]:
    """N demo sessions (seed i, name bench-i), written once and reused from ``cache``."""
    from sources.demo import write_demo_session

    tag = f"{size[0]}x{size[1]}_{fps}fps_{bitrate or 'crf23'}_{seconds:g}s"
    out = []
    for i in range(n):
        d = cache / tag / f"bench-{i}"
        if not (d / "session.yaml").is_file():
            log.info("writing session %s (%g s, %dx%d %d fps)", d, seconds, size[0], size[1], fps)
            write_demo_session(d, seconds=seconds, size=size, fps=fps, seed=i, name=f"bench-{i}", bitrate=bitrate)
        out.append(d)
    return out


# -- measuring helpers ------------------------------------------------------------------------
class _Sampler:
    """Samples, every ``period`` s: total RSS and CPU of this process and Ray's worker processes,
    and /dev/shm use (the plasma object store lives there). Peaks and CPU deltas on stop()."""

    def __init__(self, period: float = 0.25, ray_workers: bool = True) -> None:
        try:
            import psutil
        except ImportError:  # Ray ships one (ray/thirdparty_files), importable once ray is imported
            import ray  # noqa: F401
            import psutil

        self.psutil = psutil
        self.period = period
        self.ray_workers = ray_workers
        self.peak_rss = 0
        self.peak_shm = 0
        self._cpu_last: dict[int, float] = {}
        self._cpu_base: dict[int, float] = {}
        self._stop = threading.Event()
        self.t_base = time.time()
        self._shm0 = self._shm()
        self._sample(base=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _shm() -> int:
        try:
            return shutil.disk_usage("/dev/shm").used
        except OSError:
            return 0

    def _procs(self) -> list[Any]:
        # Ray started by this process: raylet, GCS and every worker are its descendants (other
        # users' Ray clusters on a shared machine are not).
        me = self.psutil.Process()
        return [me, *me.children(recursive=True)] if self.ray_workers else [me]

    def rebase(self) -> None:
        """Count CPU from now on (call when data starts flowing: actor start-up is not work)."""
        self._sample(base=True)
        self.t_base = time.time()

    def _sample(self, base: bool = False) -> None:
        rss = 0
        for p in self._procs():
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            if base:
                self._cpu_base[p.pid] = cpu
            self._cpu_last[p.pid] = cpu
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_shm = max(self.peak_shm, self._shm() - self._shm0)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu = sum(v - self._cpu_base.get(pid, 0.0) for pid, v in self._cpu_last.items())
        return {"peak_rss_bytes": self.peak_rss, "object_store_peak_bytes": self.peak_shm, "cpu_s": cpu,
                "cpu_wall_s": time.time() - self.t_base}


class _Subscriber:
    """A real SUB socket: counts embeddings per modality, keeps latency_s, until N sessions ended."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.counts: collections.Counter[str] = collections.Counter()
        self.latency: list[float] = []
        self.latency_by_modality: dict[str, list[float]] = collections.defaultdict(list)
        self.beyond: list[tuple[float, str, int, str]] = []  # (latency_s, session, window, modality) of audio, IMU
        self.windows = 0
        self.t_first_emb: float | None = None
        self.t_last_end: float | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.on_first: Any = None  # called once, at the first embedding

    def start(self, endpoint: str) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, ready), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, endpoint: str, ready: threading.Event) -> None:
        import zmq

        from sinks.protocol import decode

        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVTIMEO, 600_000)
        sock.connect(endpoint)
        sock.subscribe(b"")
        ready.set()
        ends = 0
        try:
            while ends < self.sessions:
                msg = decode(sock.recv_multipart())
                if msg.kind == "embedding":
                    if self.t_first_emb is None:
                        self.t_first_emb = time.time()
                        if self.on_first is not None:
                            self.on_first()
                    self.counts[msg.payload["modality"]] += 1
                    lat = float(msg.payload["latency_s"])
                    self.latency.append(lat)
                    self.latency_by_modality[msg.payload["modality"]].append(lat)
                    if msg.payload["modality"] in ("audio", "imu"):
                        self.beyond.append((lat, msg.payload["session"], int(msg.payload["window"]),
                                            msg.payload["modality"]))
                elif msg.payload["event"] == "end":
                    ends += 1
                    self.windows += int(msg.payload["windows"])
                    self.t_last_end = time.time()
        except BaseException as exc:
            self.error = exc
        finally:
            sock.close(linger=0)

    def join(self, timeout: float = 600) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("subscriber did not see every session's end")
        if self.error:
            raise self.error


def _by_window(beyond: list[tuple[float, str, int, str]]) -> dict[str, Any]:
    """Latency beyond the window (audio, IMU) of window 0, window 1 and the later windows."""
    groups: dict[str, list[float]] = {"0": [], "1": [], "2+": []}
    for lat, _, win, _ in beyond:
        groups[str(win) if win < 2 else "2+"].append(lat)
    return {k: percentiles(v) for k, v in groups.items() if v}


def _flops_per_item(model: Any, device: Any) -> dict[str, float]:
    """GFLOPs of one item's forward per tower (torch.utils.flop_counter, matmuls and convs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for m, x in _example_inputs(1, device, model.dtype).items():
        with FlopCounterMode(display=False) as fc:
            model.encode(m, x)
        out[m] = fc.get_total_flops() / 1e9
    del torch
    return out


def _example_inputs(b: int, device: Any, dtype: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {"vision": (3, 2, 224, 224), "audio": (1, 128, 204), "imu": (6, 2000), "depth": (1, 224, 224),
              "thermal": (1, 224, 224)}
    xs = {m: torch.randn((b, *s), generator=g).to(device=device, dtype=dtype) for m, s in shapes.items()}
    ids = torch.randint(1, 49000, (b, 77), generator=g)
    ids[:, 20] = 49407
    xs["text"] = ids.to(device)
    return xs


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _ray_start(args: argparse.Namespace) -> None:
    """Ray on every core of this machine, with call arguments inlined up to ``--max-inline-bytes``
    as ``python -m pipeline run`` does (``ray.max_inline_bytes``, pipeline.run.ray_init_kwargs)."""
    import ray

    from pipeline.run import ray_system_config

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _system_config=ray_system_config(args.max_inline_bytes))


def _achieved(counts: dict[str, int], gflops: dict[str, float], seconds: float) -> float:
    return sum(counts.get(m, 0) * gflops.get(m, 0.0) for m in gflops) * 1e9 / max(seconds, 1e-9)


# -- the four measurements ----------------------------------------------------------------------
def bench_pipeline(sessions: list[Path], args: argparse.Namespace, rate: float = 0.0) -> dict[str, Any]:
    from pipeline.config import parse_config
    from pipeline.run import run

    cfg = parse_config({
        "sessions": [str(s) for s in sessions],
        "replay": {"rate": rate, "chunk_seconds": args.chunk_seconds},
        "window": {"release": args.release, "stagger": args.stagger,
                   "spans": {"depth": {"tolerance": args.tolerance}, "thermal": {"tolerance": args.tolerance}}},
        "model": {"config": args.model, "checkpoint": args.checkpoint, "precision": args.precision,
                  "device": args.device, "threads": args.threads},
        "encoders": {"replicas": args.replicas, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "coalesce_ms": args.coalesce_ms, "prepare_ahead": {"auto": "auto", "on": True, "off": False}[args.prepare_ahead]},
        "sources": {"video_size": 224, "select_frames": args.select_frames},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 120,
                    "heartbeat_s": 2.0},
        "progress": False,
    })
    sub = _Subscriber(len(sessions))
    sampler = _Sampler()
    sub.on_first = sampler.rebase
    result = run(cfg, on_ready=sub.start)
    sub.join()
    res = sampler.stop()
    t0 = min((s.get("t_start") or np.inf) for s in result.source_stats)
    elapsed = (sub.t_last_end or time.time()) - (t0 if np.isfinite(t0) else result.elapsed_s)
    stages: dict[str, list] = collections.defaultdict(list)
    for s in result.sessions:
        for k, v in (s.get("stages") or {}).items():
            stages[k].append(v)
    cpu_stream: dict[str, float] = collections.defaultdict(float)
    split_stream: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    skipped: collections.Counter = collections.Counter()
    chunks: collections.Counter = collections.Counter()
    for s in result.source_stats:
        skipped[s["stream"]] += int(s.get("frames_skipped") or 0)
        chunks[s["stream"]] += int(s.get("chunks") or 0)
        cpu_stream[s["stream"]] += float(s.get("cpu_s") or 0.0)
        split = s.get("cpu_split") or {}
        split_stream[s["stream"]].update({k[:-2]: float(split.get(k) or 0.0) for k in _SPLIT_PARTS})
    enc_items: collections.Counter = collections.Counter()
    enc_fwd: collections.Counter = collections.Counter()
    batch_sizes: dict[str, list[int]] = collections.defaultdict(list)
    for e in result.encoder_stats:
        enc_items.update(e["items"])
        enc_fwd.update(e["forward_s"])
        for m, b in e["batch_sizes"].items():
            batch_sizes[m] += b
    return {
        "windows": sub.windows, "elapsed_s": elapsed, "windows_per_s": sub.windows / elapsed,
        "prepare_ahead": bool(result.model.get("prepare_ahead")),  # as the encoder decided it
        "embeddings_per_s": {m: n / elapsed for m, n in sorted(sub.counts.items())},
        "counts": dict(sub.counts), "latency": percentiles(sub.latency),
        "latency_by_modality": {m: percentiles(v) for m, v in sorted(sub.latency_by_modality.items())},
        # Audio and IMU end at the window end: their latency is the latency beyond the window's span.
        "latency_beyond_window": percentiles(sub.latency_by_modality["audio"] + sub.latency_by_modality["imu"]),
        # The tail by name: which windows the slowest of those were (the p99 of a short run is its top few).
        "slowest_beyond_window": [{"latency_s": round(lat, 4), "session": sess, "window": win, "modality": m}
                                  for lat, sess, win, m in sorted(sub.beyond, reverse=True)[:8]],
        # The first windows of sessions started together arrive together: the tail by window index.
        "beyond_window_by_window": _by_window(sub.beyond),
        # stage percentiles: the median over sessions of each session's p50/p99
        "stages": {k: {q: float(np.nanmedian([v[q] for v in vs])) for q in ("p50", "p99", "mean")}
                   for k, vs in stages.items()},
        "cpu_core_s_per_s_per_stream": {k: v / elapsed / len(sessions) for k, v in sorted(cpu_stream.items())},
        # The reader's CPU (its thread, read-ahead, FFmpeg's decoder and scaler threads) by part.
        "cpu_split_core_s_per_s_per_stream": {k: {part: v / elapsed / len(sessions) for part, v in parts.items()}
                                              for k, parts in sorted(split_stream.items())},
        "cpu_core_s_per_s_total": res["cpu_s"] / res["cpu_wall_s"],
        "encoder_forward_s": dict(enc_fwd), "encoder_items": dict(enc_items),
        "mean_batch": {m: float(np.mean(b)) for m, b in batch_sizes.items() if b},
        "peak_rss_bytes": res["peak_rss_bytes"], "object_store_peak_bytes": res["object_store_peak_bytes"],
        "frames_skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "chunks_per_session": {k: v / len(sessions) for k, v in sorted(chunks.items())},  # actor calls to the aligner
        "errors": {s["session"]: s["errors"] for s in result.sessions if s["errors"]},
    }


def _load_model(args: argparse.Namespace, precision: str | None = None) -> Any:
    import torch

    from encoders.imagebind import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, args.checkpoint, device=args.device, precision=precision or args.precision, seed=0)


def _align_config(args: argparse.Namespace) -> Any:
    """The pipeline's window rule with the bench's nearest-frame tolerance (same as the config)."""
    from pipeline.align import ModalitySpan

    spans = dict(DEFAULT_SPANS, depth=ModalitySpan(tolerance=args.tolerance),
                 thermal=ModalitySpan(tolerance=args.tolerance))
    return AlignConfig(spans=spans, release=args.release)


def bench_single_process(sessions: list[Path], args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from pipeline.inprocess import run_inprocess
    from sources.session import load_session
    from sinks.zmq_publisher import Publisher

    specs = [load_session(s) for s in sessions]
    pub = Publisher("tcp://127.0.0.1:*", mode="replay", wait_for_subscribers=1, wait_timeout_s=60,
                    model_name=model.config.name)
    sub = _Subscriber(len(specs))
    sub.start(pub.bound_endpoint)
    pub.wait_for_subscribers()
    sampler = _Sampler(ray_workers=False)
    try:
        r = run_inprocess(specs, model, pub, align=_align_config(args), chunk_seconds=args.chunk_seconds, video_size=224,
                          max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000.0,
                          select_frames=args.select_frames)
    finally:
        pub.close()
    sub.join()
    res = sampler.stop()
    elapsed = r.elapsed_s
    cpu_stream: dict[str, float] = collections.defaultdict(float)
    for k, v in r.source_cpu_s.items():
        cpu_stream[k.split("/", 1)[1]] += v
    return {
        "windows": sub.windows, "elapsed_s": elapsed, "windows_per_s": sub.windows / elapsed,
        "embeddings_per_s": {m: n / elapsed for m, n in sorted(sub.counts.items())},
        "counts": dict(sub.counts), "latency": percentiles(sub.latency),
        "stages": {k: {q: v[q] for q in ("p50", "p99", "mean")} for k, v in r.stages.items()},
        "cpu_core_s_per_s_per_stream": {k: v / elapsed / len(specs) for k, v in sorted(cpu_stream.items())},
        "cpu_core_s_per_s_total": res["cpu_s"] / res["cpu_wall_s"],
        "encoder_forward_s": r.forward_s, "encoder_items": r.items,
        "mean_batch": {m: float(np.mean(b)) for m, b in r.batch_sizes.items() if b},
        "peak_rss_bytes": res["peak_rss_bytes"],
        "errors": {s["session"]: s["errors"] for s in r.sessions if s["errors"]},
    }


def _windows_of(session: Path, video_size: int) -> list[Any]:
    from pipeline.inprocess import session_windows
    from sources.session import load_session

    return session_windows(load_session(session), chunk_seconds=0.5, video_size=video_size)


def bench_raw_encoder(session: Path, args: argparse.Namespace, model: Any, gflops: dict[str, float]) -> dict[str, Any]:
    """Forward only, on real preprocessed windows already on the device, batch = max_batch."""
    import torch

    from encoders.preprocess import prepare

    windows = _windows_of(session, 224)
    by_mod: dict[str, list] = collections.defaultdict(list)
    for w in windows:
        for it in w.items:
            by_mod[it.modality].append(it.payload)
    b = args.max_batch
    per_item: dict[str, float] = {}
    with torch.inference_mode():
        for m in MODALITIES:
            pays = by_mod.get(m) or []
            if not pays:
                continue
            pays = (pays * (b // len(pays) + 1))[:b]  # a full batch of real payloads
            x = prepare(m, pays, args.device)
            model.encode(m, x)
            _sync(args.device)
            n, t0 = 0, time.perf_counter()
            while True:
                model.encode(m, x)
                n += 1
                _sync(args.device)
                dt = time.perf_counter() - t0
                if dt >= args.min_time:
                    break
            per_item[m] = dt / (n * b)
    # A window = one item of every modality: windows/s = 1 / sum of per-item times.
    t_window = sum(per_item.values())
    return {
        "windows_per_s": 1.0 / t_window, "batch": b,
        "embeddings_per_s": {m: 1.0 / t for m, t in per_item.items()},
        "model_flops_per_s": sum(gflops[m] for m in per_item) * 1e9 / t_window,
    }


def bench_naive(sessions: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """A loop around the reference loaders: full-size decode, one window, one modality, batch 1,
    fp32. Video frames go through ``encoders.compat``'s reference transforms (float short-side
    scale of the full frame, normalise, centre crop), text through ``load_and_transform_text``;
    the other modalities have no per-window compat loader (those take files), so they go through
    ``prepare`` at batch 1."""
    import torch

    from encoders import compat
    from encoders.preprocess import prepare

    model = _load_model(args, precision="fp32")
    t0 = time.time()
    windows = 0
    counts: collections.Counter = collections.Counter()
    with torch.inference_mode():
        for s in sessions:
            for w in _windows_of(s, _short_side(s / "video.mp4")):  # no reduced-size decode: native frames
                windows += 1
                for it in w.items:
                    m = it.modality
                    if m == "vision":
                        frames = torch.from_numpy(np.asarray(it.payload)).permute(3, 0, 1, 2).float() / 255.0
                        x = compat._normalise_chw(compat._short_side_scale(frames, 224))
                        x = compat._uniform_crop(x, 224, 1)[None].to(args.device)
                    elif m == "text":
                        x = compat.load_and_transform_text([it.payload], args.device)
                    else:
                        x = prepare(m, [it.payload], args.device)
                    model.encode(m, x).float().cpu().numpy()
                    counts[m] += 1
    elapsed = time.time() - t0
    return {"windows": windows, "elapsed_s": elapsed, "windows_per_s": windows / elapsed,
            "embeddings_per_s": {m: n / elapsed for m, n in sorted(counts.items())}, "counts": dict(counts)}


def _short_side(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        cc = c.streams.video[0].codec_context
        return min(cc.width, cc.height)


def bench_decode(session: Path) -> dict[str, float]:
    """CPU ms per 720p frame: decode only, decode + resize in the decoder (swscale), decode +
    torch resize of the full frame: what the reduced-size decode saves."""
    import av
    import torch
    import torch.nn.functional as F

    path = session / "video.mp4"
    out: dict[str, float] = {}
    for mode in ("decode", "decode+swscale_224", "decode+rgb+torch_resize_224"):
        t0, n = time.process_time(), 0
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            w, h = st.codec_context.width, st.codec_context.height
            for f in c.decode(st):
                if mode == "decode+swscale_224":
                    f.reformat(width=round(w * 224 / h / 2) * 2, height=224, format="rgb24",
                               interpolation="AREA").to_ndarray()
                elif mode.startswith("decode+rgb"):
                    x = torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float()
                    F.interpolate(x, size=(224, round(w * 224 / h)), mode="bilinear", antialias=True)
                n += 1
        out[f"{mode}_ms_per_frame"] = (time.process_time() - t0) * 1000 / max(n, 1)
    return out


# -- memory check -------------------------------------------------------------------------------
def memory_check(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS (driver + Ray workers) and object store of a 1-minute and a 10-minute session at
    rate 0 (small video so it runs in minutes): bounded in-flight work means they match."""
    import ray

    out = {}
    for minutes in (1, 10):
        d = make_sessions(args.cache, 1, 60.0 * minutes, (320, 240), 15, None)
        _ray_start(args)
        try:
            r = bench_pipeline(d, args)
        finally:
            ray.shutdown()
        out[f"{minutes}min"] = {"windows": r["windows"], "elapsed_s": r["elapsed_s"],
                                "peak_rss_bytes": r["peak_rss_bytes"],
                                "object_store_peak_bytes": r["object_store_peak_bytes"]}
    ratio = out["10min"]["peak_rss_bytes"] / out["1min"]["peak_rss_bytes"]
    out["rss_ratio_10min_over_1min"] = ratio
    out["within_20_percent"] = bool(ratio <= 1.2)
    return out


# -- main ---------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _table(out: dict[str, Any]) -> str:
    lines = [f"bindstream pipeline bench  {out['date']}  device: {out['device']}  model: {out['model']} "
             f"{out['precision']}  max_batch {out['max_batch']}",
             f"workload: {out['sessions']} session(s) x {out['seconds']:g} s, {out['video']}, hop 1 s, "
             f"frame selection {'on' if out.get('select_frames', True) else 'off'}"]
    if out.get("note"):
        lines.append(f"NOTE: {out['note']}")
    lines.append(f"{'mode':16} {'windows/s':>10} {'vs single':>10} {'lat p50':>8} {'lat p99':>8}  embeddings/s")
    single = out.get("single_process_windows_per_s") or float("nan")
    for mode in ("pipeline", "single_process", "raw_encoder", "naive"):
        r = out["modes"].get(mode)
        if not r:
            continue
        lat = r.get("latency", {})
        emb = " ".join(f"{m[:3]}={v:.1f}" for m, v in r.get("embeddings_per_s", {}).items())
        lines.append(f"{mode:16} {r['windows_per_s']:10.2f} {r['windows_per_s'] / single:10.2f} "
                     f"{lat.get('p50', float('nan')):8.3f} {lat.get('p99', float('nan')):8.3f}  {emb}")
    for mode in ("pipeline", "single_process"):
        r = out["modes"].get(mode)
        if not r:
            continue
        st = "  ".join(f"{k} {v['p50'] * 1000:.0f}/{v['p99'] * 1000:.0f}" for k, v in r["stages"].items())
        lines.append(f"{mode} stages p50/p99 ms: {st}")
        cpu = " ".join(f"{k}={v:.3f}" for k, v in r["cpu_core_s_per_s_per_stream"].items())
        lines.append(f"{mode} CPU core-s/s per stream: {cpu}; all processes {r['cpu_core_s_per_s_total']:.2f}")
        if r.get("cpu_split_core_s_per_s_per_stream"):
            split = " ".join(f"{k}={v['decode']:.3f}/{v['resize']:.3f}/{v['other']:.3f}"
                             for k, v in r["cpu_split_core_s_per_s_per_stream"].items())
            lines.append(f"{mode} source CPU core-s/s per stream, decode/resize/other: {split}")
        if r.get("frames_skipped"):
            lines.append(f"{mode} frames skipped by selection: "
                         + " ".join(f"{k}={v}" for k, v in r["frames_skipped"].items()))
        lines.append(f"{mode} peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
                     + (f", object store peak {r['object_store_peak_bytes'] / 2**20:.0f} MiB"
                        if "object_store_peak_bytes" in r else "")
                     + f", achieved model {r.get('model_flops_per_s', 0) / 1e9:.1f} GFLOP/s")
    if "raw_encoder" in out["modes"]:
        r = out["modes"]["raw_encoder"]
        lines.append(f"raw_encoder achieved {r['model_flops_per_s'] / 1e9:.1f} GFLOP/s; GFLOPs per item: "
                     + " ".join(f"{m}={g:.2f}" for m, g in out["gflops_per_item"].items()))
    if "decode" in out:
        lines.append("decode CPU ms/frame: " + "  ".join(f"{k}={v:.1f}" for k, v in out["decode"].items()))
    if "realtime" in out:
        r = out["realtime"]
        beyond = r["latency_beyond_window"]
        start = "staggered" if r["stagger"] else "together"
        lines.append(f"realtime: {r['sessions']} session(s) at rate 1.0, {start}: latency beyond the window's span "
                     f"(audio, IMU) p50 {beyond['p50']:.3f} p99 {beyond['p99']:.3f} s, windows "
                     f"{r['windows']}/{r['expected_windows']}, held (p99 <= {r['target_p99_s']} s, all windows): {r['held']} "
                     f"(chunk_seconds {r['chunk_seconds']}, depth/thermal tolerance {r['tolerance_s']} s)")
        lines.append("realtime embedding latency p50/p99 s: "
                     + "  ".join(f"{m} {v['p50']:.2f}/{v['p99']:.2f}" for m, v in r["latency_by_modality"].items())
                     + f"  all {r['latency']['p50']:.2f}/{r['latency']['p99']:.2f}")
        st = "  ".join(f"{k} {v['p50'] * 1000:.0f}/{v['p99'] * 1000:.0f}" for k, v in r["stages"].items())
        lines.append(f"realtime stages p50/p99 ms: {st}")
    if "memory_check" in out:
        r = out["memory_check"]
        lines.append(f"memory: peak RSS 1 min {r['1min']['peak_rss_bytes'] / 2**20:.0f} MiB, 10 min "
                     f"{r['10min']['peak_rss_bytes'] / 2**20:.0f} MiB (x{r['rss_ratio_10min_over_1min']:.2f}; "
                     f"within 20%: {r['within_20_percent']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sessions", type=int, default=2, help="sessions replayed at once (default 2)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each session (default 8)")
    p.add_argument("--model", default="imagebind_tiny", help="imagebind_tiny (default) | imagebind_huge")
    p.add_argument("--checkpoint", default="none", help="none (seeded random weights, default) | auto | path")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-batch", type=int, default=8, help="items per forward per tower (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--coalesce-ms", type=float, default=EncodersConfig.coalesce_ms,
                   help="encoders.coalesce_ms: a session's releases within this many ms share one encoder "
                        "call (default %(default)s; 0 = each at once)")
    p.add_argument("--prepare-ahead", default="auto", choices=("auto", "on", "off"),
                   help="encoders.prepare_ahead: preprocess the next batch in a second thread while the model "
                        "runs this one (default auto = on a GPU, or on a CPU when --threads leaves a core free)")
    p.add_argument("--replicas", type=int, default=1, help="encoder actors in the pipeline")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per encoder (default 1 on CPU so decode keeps a core, 0 = torch default)")
    p.add_argument("--size", default="1280x720", help="video WxH (default 1280x720)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--bitrate", type=int, default=2_000_000, help="video bits/s (default 2000000)")
    p.add_argument("--modes", nargs="+", default=["pipeline", "single_process", "raw_encoder", "naive"],
                   choices=["pipeline", "single_process", "raw_encoder", "naive"])
    p.add_argument("--max-inline-bytes", type=int, default=RayConfig.max_inline_bytes,
                   help="ray.max_inline_bytes: call arguments up to this size skip the object store "
                        "(default %(default)s; Ray's own default is 102400)")
    p.add_argument("--chunk-seconds", type=float, default=0.5,
                   help="replay.chunk_seconds: stream time per source chunk (default 0.5; a chunk's "
                        "samples wait for it to close, so it bounds latency from below at rate 1)")
    p.add_argument("--release", choices=("stream", "window"), default=WindowConfig.release,
                   help="window.release: each stream's part of a window as soon as that stream is complete "
                        "(stream, the default), or whole windows once every stream is (window)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_SPANS["depth"].tolerance,
                   help="depth/thermal nearest-frame tolerance, s (default %(default)s as in the config; a "
                        "window waits until these streams pass its end + tolerance)")
    p.add_argument("--no-select-frames", dest="select_frames", action="store_false",
                   help="scale / decode every video and depth/thermal frame (sources.select_frames: "
                        "false), in pipeline and single_process alike; the default selects")
    p.add_argument("--realtime", type=int, default=0, metavar="N",
                   help="also replay N sessions at rate 1.0 and report whether latency held")
    p.add_argument("--no-stagger", dest="stagger", action="store_false",
                   help="start every session's replay clock together (window.stagger: false), so their windows "
                        "end in the same instants: the worst case for latency")
    p.add_argument("--target-p99", type=float, default=0.25, help="realtime latency target, s (default 0.25)")
    p.add_argument("--memory-check", action="store_true",
                   help="only: peak memory of a 10-minute vs a 1-minute session at rate 0")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds timed per raw_encoder tower")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "bindstream" / "bench", help="where the synthetic sessions are written once")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    # Ray's raylet writes warnings to this process's stdout; with --json, stdout must hold only
    # the JSON object, so everything else goes to stderr until the end.
    json_fd = None
    if args.json:
        sys.stdout.flush()
        json_fd = os.dup(1)
        os.dup2(2, 1)
    try:
        out = _run(args)
    finally:
        if json_fd is not None:
            sys.stdout.flush()
            os.dup2(json_fd, 1)
            os.close(json_fd)
    print(json.dumps(out, indent=2, default=float) if args.json else _table(out))
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    w, h = (int(v) for v in args.size.lower().split("x"))
    out: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "device": _device_name(args.device),
        "model": args.model, "precision": args.precision, "max_batch": args.max_batch,
        "sessions": args.sessions, "seconds": args.seconds,
        "video": f"{w}x{h} {args.fps} fps H.264 {args.bitrate / 1e6:g} Mbit/s + AAC, IMU 200 Hz, depth/thermal 10 Hz",
        "torch_threads_per_encoder": args.threads, "select_frames": args.select_frames,
        "max_inline_bytes": args.max_inline_bytes, "release": args.release, "modes": {},
    }
    if args.device == "cpu":
        out["note"] = (f"CPU run: {args.model}, {args.sessions} x {args.seconds:g} s sessions, torch threads "
                       f"{args.threads}: sized to finish in minutes on a small machine; not GPU figures")

    if args.memory_check:
        out["memory_check"] = memory_check(args)
        return out

    sessions = make_sessions(args.cache, args.sessions, args.seconds, (w, h), args.fps, args.bitrate)
    out["video_bits_per_s"] = float(np.mean([(s / "video.mp4").stat().st_size * 8 / args.seconds for s in sessions]))
    model = _load_model(args)
    gflops = _flops_per_item(model, args.device)
    out["gflops_per_item"] = gflops
    out["decode"] = bench_decode(sessions[0])

    if "single_process" in args.modes:
        log.info("single_process ...")
        r = bench_single_process(sessions, args, model)
        r["model_flops_per_s"] = _achieved(r["counts"], gflops, r["elapsed_s"])
        out["modes"]["single_process"] = r
    if "pipeline" in args.modes or args.realtime:
        import ray  # only here: the other modes run where Ray is not installed (a lent GPU machine, say)

        _ray_start(args)
        try:
            if "pipeline" in args.modes:
                log.info("pipeline ...")
                r = bench_pipeline(sessions, args)
                r["model_flops_per_s"] = _achieved(r["counts"], gflops, r["elapsed_s"])
                out["modes"]["pipeline"] = r
            if args.realtime:
                log.info("realtime: %d sessions at rate 1.0 ...", args.realtime)
                rt = make_sessions(args.cache, args.realtime, args.seconds, (w, h), args.fps, args.bitrate)
                r = bench_pipeline(rt, args, rate=1.0)
                expected = sum(int(np.ceil(args.seconds)) for _ in rt)
                out["realtime"] = {
                    "sessions": args.realtime, "stagger": args.stagger, "latency": r["latency"],
                    "latency_by_modality": r["latency_by_modality"], "stages": r["stages"],
                    "windows": r["windows"], "expected_windows": expected, "elapsed_s": r["elapsed_s"],
                    "target_p99_s": args.target_p99, "chunk_seconds": args.chunk_seconds,
                    "tolerance_s": args.tolerance,
                    "latency_beyond_window": r["latency_beyond_window"],
                    "slowest_beyond_window": r["slowest_beyond_window"],
                    "beyond_window_by_window": r["beyond_window_by_window"],
                    "prepare_ahead": r["prepare_ahead"],
                    "held": bool(r["latency_beyond_window"]["p99"] <= args.target_p99 and r["windows"] >= expected),
                    "cpu_core_s_per_s_total": r["cpu_core_s_per_s_total"],
                    "cpu_split_core_s_per_s_per_stream": r["cpu_split_core_s_per_s_per_stream"],
                }
        finally:
            ray.shutdown()
    if "raw_encoder" in args.modes:
        log.info("raw_encoder ...")
        out["modes"]["raw_encoder"] = bench_raw_encoder(sessions[0], args, model, gflops)
    if "naive" in args.modes:
        log.info("naive ...")
        out["modes"]["naive"] = bench_naive(sessions, args)

    def rate(mode: str) -> float | None:
        r = out["modes"].get(mode)
        return float(r["windows_per_s"]) if r else None

    out["pipeline_windows_per_s"] = rate("pipeline")
    out["single_process_windows_per_s"] = rate("single_process")
    out["raw_encoder_windows_per_s"] = rate("raw_encoder")
    out["naive_windows_per_s"] = rate("naive")
    lat = (out["modes"].get("pipeline") or out["modes"].get("single_process") or {}).get("latency", {})
    out["latency_p50_s"] = lat.get("p50")
    out["latency_p99_s"] = lat.get("p99")
    if out["pipeline_windows_per_s"] and out["single_process_windows_per_s"]:
        out["pipeline_over_single_process"] = out["pipeline_windows_per_s"] / out["single_process_windows_per_s"]
    if out["pipeline_windows_per_s"] and out["naive_windows_per_s"]:
        out["pipeline_over_naive"] = out["pipeline_windows_per_s"] / out["naive_windows_per_s"]
    if out["pipeline_windows_per_s"] and out["raw_encoder_windows_per_s"]:
        out["pipeline_over_raw_encoder"] = out["pipeline_windows_per_s"] / out["raw_encoder_windows_per_s"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
