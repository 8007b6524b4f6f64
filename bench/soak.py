"""Endurance: replay a session in a loop for a given time; report memory, object store, fds, drops.

    python bench/soak.py --minutes 30 [--session DIR] [--config configs/demo.yaml] [--rate 0]

Ray is started once; each iteration is one full ``pipeline.run.run`` of the session (actors
created, session replayed to the end, actors killed), so what accumulates across iterations
is what a long-running driver, Ray's own daemons and the object store keep. Prints one JSON
line per iteration, then a summary line comparing the end with the state after warm-up (the
first ``--warmup`` fraction of the run): RSS growth (%) of the driver and of its process tree
(GCS, raylet, workers) and of what persists (driver + Ray daemons, the verdict), open file
descriptors, object-store use and drop counters. Exit code 1 when RSS grew more than ``--max-rss-growth`` percent or fds grew after warm-up.
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

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


if __name__ == "__main__":
    sys.exit(main())
