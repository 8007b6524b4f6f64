"""What the encoder actor costs on top of the work it does: CPU per second for N windows a second.

    python bench/encoder_calls.py                  # inproc, each, many; 6 windows a second, 20 s each
    python bench/encoder_calls.py --windows-per-s 10 --modes each many --seconds 30

The windows are a bench session's (`bench/pipeline.py`'s 720p30 demo session, written once into
the cache): 1 s windows of vision, audio, IMU, depth, thermal and captions. Every second, N of
them are encoded (as N real-time sessions would offer them), for ``--seconds``:

* ``inproc``: preprocessing and the model in this thread, each tower in batches of ``--max-batch``
  (the work itself; no Ray, no batcher, no threads);
* ``each``: one :class:`pipeline.encoder_actor.EncoderActor` (one torch thread), one
  ``encode_each`` call per window (each tower's rows as it finishes: paced replay and live);
* ``many``: the same with ``encode_many`` (one answer per call: ``rate: 0``).

Prints per mode the CPU cores used: the encoder's process (this one for ``inproc``, with each
tower's CPU milliseconds a second in preprocessing and in the model) and, for the actor modes,
the calling process's. Exit codes: 0 done; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _windows(cache: Path, n: int) -> list[dict[str, list[Any]]]:
    """Up to ``n`` windows of the bench session, each as its payloads by modality."""
    from bench.pipeline import _windows_of, make_sessions

    session = make_sessions(cache, 1, 30.0, (1280, 720), 30, 2_000_000)[0]
    out = []
    for w in _windows_of(session, 224):
        groups: dict[str, list[Any]] = collections.defaultdict(list)
        for it in w.items:
            groups[it.modality].append(it.payload)
        if len(groups) >= 5:  # the session's first and last windows lack streams
            out.append(dict(groups))
    return out[:n]


def _proc_cpu_s(pid: int) -> float:
    import psutil  # Ray's own copy (ray/thirdparty_files) once ray is imported, as bench/pipeline.py uses

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _paced(seconds: float, step) -> float:
    """``step(k)`` once a second for ``seconds``; returns the seconds it ran."""
    t0, k = time.time(), 0
    while time.time() - t0 < seconds:
        step(k)
        k += 1
        time.sleep(max(0.0, t0 + k - time.time()))
    return time.time() - t0


def run_inproc(windows: list, args: argparse.Namespace) -> dict[str, float]:
    """The cores the work takes, and per tower the CPU milliseconds a second spent preprocessing
    (``<tower>_prep_ms``) and in the model (``<tower>_model_ms``)."""
    import torch

    from encoders.imagebind import load
    from encoders.preprocess import prepare

    torch.set_num_threads(1)
    model = load(args.model, "none", device="cpu", precision=args.precision, seed=0)

    split: collections.Counter = collections.Counter()

    def step(k: int) -> None:
        batch: dict[str, list[Any]] = collections.defaultdict(list)
        for i in range(args.windows_per_s):
            for m, payloads in windows[(k + i) % len(windows)].items():
                batch[m] += payloads
        with torch.inference_mode():
            for m, payloads in batch.items():
                for j in range(0, len(payloads), args.max_batch):
                    t0 = time.thread_time()
                    x = prepare(m, payloads[j:j + args.max_batch], "cpu", config=model.config)
                    t1 = time.thread_time()
                    model.encode(m, x)
                    split[f"{m}_prep_ms"] += t1 - t0
                    split[f"{m}_model_ms"] += time.thread_time() - t1

    step(0)  # warm up: the first call of each tower pays one-off costs
    split.clear()
    c0 = time.thread_time()
    elapsed = _paced(args.seconds, step)
    return {"encoder_cores": (time.thread_time() - c0) / elapsed,
            **{k: 1000.0 * v / elapsed for k, v in sorted(split.items())}}


def run_actor(windows: list, args: argparse.Namespace, mode: str) -> dict[str, float]:
    import ray

    from pipeline.encoder_actor import EncoderActor

    options = {"config": args.model, "checkpoint": "none", "precision": args.precision, "device": "cpu",
               "threads": 1, "seed": 0}
    enc = EncoderActor.remote(options, args.max_batch, 20.0, "auto", None)
    pid = ray.get(enc.info.remote())["pid"]
    ray.get(enc.warmup.remote())

    def step(k: int) -> None:
        calls = [windows[(k + i) % len(windows)] for i in range(args.windows_per_s)]
        if mode == "each":
            for gen in [enc.encode_each.remote(g) for g in calls]:
                for ref in gen:
                    ray.get(ref)
        else:
            ray.get([enc.encode_many.remote(g) for g in calls])

    step(0)
    c0, me0 = _proc_cpu_s(pid), time.process_time()
    elapsed = _paced(args.seconds, step)
    out = {"encoder_cores": (_proc_cpu_s(pid) - c0) / elapsed, "caller_cores": (time.process_time() - me0) / elapsed}
    ray.kill(enc)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["inproc", "each", "many"], choices=["inproc", "each", "many"])
    p.add_argument("--windows-per-s", type=int, default=6)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--model", default="imagebind_tiny")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "bindstream" / "bench")
    args = p.parse_args(argv)
    windows = _windows(args.cache, 30)
    if any(m != "inproc" for m in args.modes):
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    for mode in args.modes:
        got = run_inproc(windows, args) if mode == "inproc" else run_actor(windows, args, mode)
        print(f"{mode:7s} {args.windows_per_s} windows/s: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
