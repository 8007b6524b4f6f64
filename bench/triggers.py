"""Trigger cost: per window for many triggers, and the pipeline's windows/s with triggers on vs off.

    python bench/triggers.py                 # both parts
    python bench/triggers.py --part eval     # the evaluator alone (no Ray)
    python bench/triggers.py --part pipeline --seconds 20 --repeats 2

``eval``: :class:`pipeline.triggers.TriggerEvaluator` with ``--triggers`` triggers watching all six
modalities (1024-d, ImageBind huge's size), fed one record per modality per window; the time per
window (six records), for raw cosine and for calibrated scores (10 background prompts). Scores
are random, so some windows start and end events (the state machines run, not only the scoring).

``pipeline``: the demo session (``--seconds`` long) through the Ray graph at ``replay.rate: 0``
with imagebind_tiny, without triggers and with ``--triggers`` text triggers on every modality
(the same session, alternating, ``--repeats`` times each); windows/s is windows over the time
from the publisher being bound (encoders loaded and warm) to the run's end, which includes
starting the session actor and the prompts' one encoder call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.triggers import TriggerEvaluator, TriggerRule  # noqa: E402

MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")


class _Rec:
    __slots__ = ("stream", "modality", "window", "t_start", "t_end", "embedding")

    def __init__(self, modality: str, window: int, embedding: np.ndarray) -> None:
        self.stream, self.modality, self.window = modality, modality, window
        self.t_start, self.t_end, self.embedding = window - 1.0, window + 1.0, embedding


def bench_eval(n_triggers: int, windows: int, dim: int, score: str) -> float:
    """Seconds per window (six records) for ``n_triggers`` triggers."""
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    prompts = unit(rng.normal(size=(n_triggers, dim)))
    # Window embeddings near some prompts now and then, so events start and end.
    base = unit(rng.normal(size=(windows, len(MODALITIES), dim)))
    near = rng.integers(0, n_triggers, size=(windows, len(MODALITIES)))
    emb = unit(base + 0.8 * prompts[near] * (rng.random((windows, len(MODALITIES), 1)) < 0.3))
    rules = [TriggerRule(f"t{i}", on=0.5 if score == "cosine" else 0.6, off=0.4 if score == "cosine" else 0.5,
                         min_duration_s=1.0, cooldown_s=2.0, score=score) for i in range(n_triggers)]
    ev = TriggerEvaluator("bench", rules, {r.name: {"text": prompts[i]} for i, r in enumerate(rules)},
                          background=unit(rng.normal(size=(10, dim))) if score == "calibrated" else None)
    records = [[_Rec(m, k, emb[k, j]) for j, m in enumerate(MODALITIES)] for k in range(windows)]
    events = 0
    t0 = time.perf_counter()
    for recs in records:
        events += len(ev.observe(recs))
    elapsed = time.perf_counter() - t0
    print(f"  {score:10s}: {elapsed / windows * 1e3:.3f} ms per window ({n_triggers} triggers x {len(MODALITIES)} "
          f"modalities, dim {dim}, {windows} windows, {events} events)")
    return elapsed / windows


def _run_once(session: Path, triggers: list[dict]) -> float:
    from pipeline.config import parse_config
    from pipeline.run import run

    cfg = parse_config({"sessions": [str(session)], "replay": {"rate": 0},
                        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32"},
                        "publish": {"endpoint": "tcp://127.0.0.1:*"}, "progress": False, "triggers": triggers})
    ready: list[float] = []
    result = run(cfg, on_ready=lambda endpoint: ready.append(time.time()))
    assert result.exit_code == 0, result.sessions
    return result.sessions[0]["windows"] / (time.time() - ready[0])


def bench_pipeline(seconds: float, n_triggers: int, repeats: int) -> tuple[float, float]:
    import ray

    from sources.demo import write_demo_session

    session = write_demo_session(Path(tempfile.mkdtemp()) / "demo", seconds=seconds)
    triggers = [{"name": f"t{i}", "text": f"prompt number {i}", "on": 0.99, "off": 0.98} for i in range(n_triggers)]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    off, on = [], []
    try:
        for _ in range(repeats):
            off.append(_run_once(session, []))
            on.append(_run_once(session, triggers))
    finally:
        ray.shutdown()
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"  triggers off: {m_off:.1f} windows/s  {[round(x, 1) for x in off]}")
    print(f"  {n_triggers} triggers on: {m_on:.1f} windows/s  {[round(x, 1) for x in on]}  ratio {m_on / m_off:.3f}")
    return m_off, m_on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("eval", "pipeline", "all"), default="all")
    p.add_argument("--triggers", type=int, default=100)
    p.add_argument("--windows", type=int, default=2000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.part in ("eval", "all"):
        print("trigger evaluation per window (target < 1 ms):")
        for score in ("cosine", "calibrated"):
            bench_eval(args.triggers, args.windows, args.dim, score)
    if args.part in ("pipeline", "all"):
        print(f"pipeline windows/s, {args.seconds:g} s demo session at rate 0 (target: on >= 0.95 x off):")
        bench_pipeline(args.seconds, args.triggers, args.repeats)


if __name__ == "__main__":
    main()
