"""Endurance: replay a session in a loop for a given time; report memory, object store, fds, drops.

    python bench/soak.py --minutes 30 [--session DIR] [--config configs/demo.yaml] [--rate 0]

Ray is started once; each iteration is one full ``pipeline.run.run`` of the session (actors
created, session replayed to the end, actors killed), so what accumulates across iterations
is what a long-running driver, Ray's own daemons and the object store keep. Prints one JSON
line per iteration, then a summary line comparing the end with the state after warm-up (the
first ``--warmup`` fraction of the run): RSS growth (%) of the driver and of its process tree
(GCS, raylet, workers) and of what persists (driver + Ray daemons, the verdict), open file
descriptors, object-store use and drop counters. Exit code 1 when RSS grew more than ``--max-rss-growth`` percent or fds grew after warm-up.

    python bench/soak.py --hostile --minutes 10

``--hostile``: one live run of ``--minutes`` under a mix of attacks (tests/live_peers.py peers on
127.0.0.1): a clean IMU stream that also sends a wild timestamp (+1e6 s, -1e9 s, +1e9 s) every
1.5 s, a clean imagezmq camera (REQ) alternating two frame sizes, a flood of 8 MB depth frames
at 20 a second against a 16 MiB ``queue_bytes`` budget, and a depth sender whose messages are
in turn fine, over ``max_bytes`` and over twice it. Prints the session process's RSS every 5 s,
then a summary: RSS growth after warm-up, every drop counter, the clean streams' embeddings,
whether every imagezmq request got its reply. Exit 1 unless RSS stayed flat (within
``--max-rss-growth`` percent), the clean streams produced embeddings throughout and nothing failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray  # first: Ray ships psutil in its thirdparty_files and puts it on sys.path

import psutil  # noqa: E402

# bench/pipeline.py would shadow the pipeline package, here and in Ray workers (Ray copies the
# script directory to workers only while it is on sys.path): take it off, put the repo root first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("soak")


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _is_worker(p: psutil.Process) -> bool:
    """Ray worker processes (actors, idle workers) come and go with every run; the daemons
    (GCS, raylet, ...) and the driver are what a long-running deployment keeps."""
    try:
        return p.name().startswith("ray::") or any("default_worker.py" in a for a in p.cmdline())
    except psutil.Error:
        return True


def _sample() -> dict[str, Any]:
    rss = fds = rss_daemons = fds_daemons = 0
    procs = workers = 0
    me = psutil.Process()
    for p in _tree():
        try:
            r, f = p.memory_info().rss, p.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += r
        fds += f
        procs += 1
        if p.pid != me.pid and _is_worker(p):
            workers += 1
        else:
            rss_daemons += r
            fds_daemons += f
    return {
        "rss_driver_mb": round(me.memory_info().rss / 2**20, 1),
        "rss_daemons_mb": round(rss_daemons / 2**20, 1),  # driver + Ray daemons
        "rss_tree_mb": round(rss / 2**20, 1),
        "fds_driver": me.num_fds(),
        "fds_daemons": fds_daemons,
        "fds_tree": fds,
        "processes": procs,
        "workers": workers,
        "object_store_mb": _object_store_mb(),
    }


def _object_store_mb() -> float | None:
    """Resident pages of the plasma object store (the raylet's ``/dev/shm/plasma*`` mapping):
    what the store has touched. This Ray build has no gRPC client for ``ray memory``, so the
    mapping is read from ``/proc`` (Linux only; None elsewhere)."""
    total_kb = 0
    found = False
    for p in _tree():
        try:
            if "raylet" not in p.name():
                continue
            with open(f"/proc/{p.pid}/smaps") as f:
                in_plasma = False
                for line in f:
                    if "-" in line.split(" ", 1)[0]:  # a mapping header line
                        in_plasma = "plasma" in line
                    elif in_plasma and line.startswith("Rss:"):
                        total_kb += int(line.split()[1])
                        found = True
        except (OSError, psutil.Error):
            continue
    return round(total_kb / 1024, 1) if found else None


def _config(args: argparse.Namespace, session: Path):
    from pipeline.config import load_config, parse_config

    overrides = [f"sessions=[{session}]", f"replay.rate={args.rate}", "publish.endpoint=tcp://127.0.0.1:*",
                 "publish.wait_for_subscribers=0", "progress=false"]
    if args.config:
        return load_config(args.config, overrides)
    return parse_config({
        "sessions": [str(session)],
        "replay": {"rate": args.rate},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu",
                  "threads": 1},
        "publish": {"endpoint": "tcp://127.0.0.1:*"},
        "progress": False,
    })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--session", type=Path, help="session folder (default: a 5 s demo session in a temp dir)")
    ap.add_argument("--config", help="run config to take model/encoder settings from (default: tiny model, CPU)")
    ap.add_argument("--rate", type=float, default=0.0, help="replay rate (0 = as fast as possible)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run treated as warm-up")
    ap.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after warm-up")
    ap.add_argument("--hostile", action="store_true", help="one live run under floods, clock jumps and odd frames")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.hostile:
        return _hostile(args)

    from sources.demo import write_demo_session
    from pipeline.run import run

    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    session = args.session or write_demo_session(Path(tmp.name) / "s", seconds=5.0, seed=0, name="soak")
    cfg = _config(args, session)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t0 = time.time()
    deadline = t0 + args.minutes * 60
    rows: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    it = 0
    try:
        while time.time() < deadline:
            result = run(cfg, progress=False)
            it += 1
            s = result.sessions[0]
            for k, v in s["dropped"].items():
                totals[k] = totals.get(k, 0) + int(v)
            row = {"t_s": round(time.time() - t0, 1), "iteration": it, "windows": s["windows"],
                   "embeddings": sum(s["counts"].values()), "errors": len(s["errors"]),
                   "encode_retries": s.get("encode_retries", 0), "dropped_total": sum(totals.values()),
                   **_sample()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        tmp.cleanup()
    if len(rows) < 2:
        print(json.dumps({"summary": "too short", "iterations": len(rows)}))
        return 1
    # Compare medians over windows of iterations, not two single samples: fd counts jump by a few
    # with every transient socket, and Ray's log monitor opens and closes worker log files.
    n = len(rows)
    w0 = max(1, int(n * args.warmup))
    span = max(1, int(n * 0.2))
    warm_rows, last_rows = rows[w0:w0 + span] or rows[-1:], rows[-span:]

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    def growth(key: str) -> float:
        a, b = med(warm_rows, key), med(last_rows, key)
        return round(100.0 * (b - a) / max(a, 1e-9), 2)

    def pair(key: str) -> list[float]:
        return [med(warm_rows, key), med(last_rows, key)]

    summary = {
        "summary": True, "minutes": round(rows[-1]["t_s"] / 60, 2), "iterations": n,
        "warm_iterations": [warm_rows[0]["iteration"], warm_rows[-1]["iteration"]],
        "last_iterations": [last_rows[0]["iteration"], last_rows[-1]["iteration"]],
        "rss_driver_growth_pct": growth("rss_driver_mb"), "rss_daemons_growth_pct": growth("rss_daemons_mb"),
        "rss_tree_growth_pct": growth("rss_tree_mb"),
        "fds_driver_median_warm_last": pair("fds_driver"),
        "fds_daemons_median_warm_last": pair("fds_daemons"),
        "fds_tree_median_warm_last": pair("fds_tree"),
        "object_store_mb_median_warm_last": pair("object_store_mb"),
        "dropped": totals, "errors": sum(r["errors"] for r in rows),
    }
    print(json.dumps(summary), flush=True)
    # Workers are transient (each iteration starts and kills its actors), so the verdict is on
    # what persists: the driver and Ray's daemons. The tree total is printed for information.
    fd_d, fd_r = summary["fds_driver_median_warm_last"], summary["fds_daemons_median_warm_last"]
    ok = (summary["rss_driver_growth_pct"] <= args.max_rss_growth
          and summary["rss_daemons_growth_pct"] <= args.max_rss_growth
          and fd_d[1] <= fd_d[0] and fd_r[1] <= fd_r[0] * 1.1 and summary["errors"] == 0)
    return 0 if ok else 1


def _hostile_peers(epoch: float) -> tuple[list[Any], list[dict[str, Any]], Any]:
    """The attacking and clean peers (not started), the session's streams, and the camera."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from live_peers import FramePublisher, ImageZmqFeeder, ImuPublisher, free_port, real_frames

    ports = [free_port() for _ in range(4)]
    imu = ImuPublisher(ports[0], epoch, rate=100, jitter_s=0.001)
    imu.wild = [(2.0 + 1.5 * i, (1e6, -1e9, 1e9)[i % 3]) for i in range(100_000)]
    small = real_frames(6)
    big = [np.ascontiguousarray(np.repeat(np.repeat(f, 2, axis=0), 2, axis=1)[:360]) for f in small]
    cam = ImageZmqFeeder(f"tcp://127.0.0.1:{ports[1]}", [x for p in zip(small, big) for x in p], reqrep=True, fps=10)
    frame = (np.arange(2048 * 2048, dtype=np.uint32) % 5000).astype(np.uint16).reshape(2048, 2048)
    flood = FramePublisher(ports[2], epoch, [frame], fps=20)
    odd = FramePublisher(ports[3], epoch, [np.zeros((512, 512), np.uint16), np.zeros((768, 1024), np.uint16),
                                           np.zeros((1024, 1536), np.uint16)], fps=6)
    ep = [f"tcp://127.0.0.1:{p}" for p in ports]
    streams = [{"id": "imu", "modality": "imu", "kind": "zmq", "endpoint": ep[0], "clock": "device"},
               {"id": "cam", "modality": "vision", "kind": "imagezmq", "endpoint": ep[1]},
               {"id": "flood", "modality": "depth", "kind": "zmq", "endpoint": ep[2], "queue_bytes": 16 << 20},
               {"id": "odd", "modality": "thermal", "kind": "zmq", "endpoint": ep[3], "max_bytes": 1 << 20}]
    return [imu, cam, flood, odd], streams, cam


def _hostile(args: argparse.Namespace) -> int:
    import threading

    from pipeline.config import parse_config
    from pipeline.run import run

    peers, streams, cam = _hostile_peers(time.time())
    cfg = parse_config({
        "sessions": [{"name": "hostile", "streams": streams}], "stop_after": args.minutes * 60,
        "window": {"hop": 0.25, "spans": {"imu": {"span": 0.5}}},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "device": "cpu", "threads": 1},
        "publish": {"endpoint": "tcp://127.0.0.1:*"}, "progress": False})
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows: list[dict[str, Any]] = []
    halt = threading.Event()
    t0 = time.time()

    def sample() -> None:
        while not halt.wait(5.0):
            workers = [p for p in _tree() if _is_worker(p)]
            rss = {p.pid: p.memory_info().rss for p in workers if p.is_running()}
            rows.append({"t_s": round(time.time() - t0, 1), "rss_workers_mb": round(sum(rss.values()) / 2**20, 1),
                         "rss_max_worker_mb": round(max(rss.values(), default=0) / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run(cfg, progress=False, on_ready=lambda _: [p.start() for p in peers])
    finally:
        halt.set()
        for p in peers:
            p.halt.set()
        ray.shutdown()
    return _hostile_verdict(args, result, rows, cam)


def _hostile_verdict(args: argparse.Namespace, result: Any, rows: list[dict[str, Any]], cam: Any) -> int:
    s = result.sessions[0]
    n = len(rows)
    warm = rows[max(1, int(n * args.warmup)):][: max(1, n // 5)] or rows[-1:]
    last = rows[-max(1, n // 5):]
    a = statistics.median(r["rss_max_worker_mb"] for r in warm) if warm else 0.0
    b = statistics.median(r["rss_max_worker_mb"] for r in last) if last else 0.0
    growth = round(100.0 * (b - a) / max(a, 1e-9), 2)
    expect = 0.5 * result.elapsed_s / 0.25
    summary = {"summary": True, "hostile": True, "minutes": round(result.elapsed_s / 60, 2), "exit_code": result.exit_code,
               "rss_max_worker_mb_warm_last": [a, b], "rss_growth_pct": growth, "dropped": s["dropped"],
               "counts": s["counts"], "windows": s["windows"], "errors": s["errors"],
               "imagezmq_requests": len(cam.sent), "imagezmq_replies": len(cam.replies)}
    print(json.dumps(summary), flush=True)
    ok = (result.exit_code == 0 and growth <= args.max_rss_growth and len(cam.replies) == len(cam.sent)
          and s["counts"].get("imu", 0) >= expect * 0.5 and s["counts"].get("vision", 0) > 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
