"""The embedding store (sinks/store.py): append rate, live-hour fragments, pipeline windows/s
with the store on and off, filtered top-10 search latency and recall against exact search.

    python bench/store.py [--rows 100000] [--queries 150] [--nprobes 16,32] [--pairs 3] [--root /tmp]

* append: ``EmbeddingStore.upsert`` (LanceDB ``merge_insert`` on the key) of ``--append-rows``
  1024-d rows in batches of ``store.batch_rows`` (1024) into a growing table: rows/s.
* live hour: ``--hour-writes`` small writes (6 rows each: one window of six modalities per
  second), ``maintain()`` (indexes + ``optimize()``) every 60 writes as ``store.optimize_every_s``
  does: fragments at the end, and the most seen.
* pipeline: the demo session (``--seconds``) through the Ray graph at ``replay.rate: 0``
  (imagebind_tiny, random weights), store off then on, ``--pairs`` times: windows/s per run.
* search: ``--rows`` unit vectors in sessions of 5,000 rows (833 windows x 6 modalities), each
  window near the concept its 30-window scene shows (512 concepts), written in appends of 50,000
  while numpy keeps each query's exact top 10; queries near a random concept, a third filtered
  by one session, a third by one modality, a third by both. Latency p50/p95 of an exact scan
  (25 queries), the build time of the store's indexes (``maintain()``), then ``nearest()`` as
  the store answers it, and again with each ``--nprobes``: p50/p95 and recall@10, overall and
  per filter kind.

Prints one JSON object per part.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, not bench/

from sinks.store import EmbeddingStore, StoreRow, embeddings_schema  # noqa: E402

MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")


def _model(dim: int) -> dict:
    return {"model": "bench", "dim": dim, "config": "imagebind_huge", "checkpoint": "auto", "seed": 0, "precision": "bf16"}


def _rows(n: int, dim: int, rng: np.random.Generator, start: int = 0, sessions: int = 20) -> list[StoreRow]:
    centers = rng.standard_normal((32, dim)).astype(np.float32)
    vec = centers[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    out = []
    for i in range(n):
        w = start + i
        out.append(StoreRow("bench", f"s{w % sessions}", "cam", MODALITIES[(w // sessions) % 6], w // (sessions * 6),
                            float(w), float(w) + 1.0, vec[i], time.time(), "bench"))
    return out


def bench_append(root: Path, n: int, dim: int, batch: int) -> dict:
    store = EmbeddingStore.create(str(root / "append"), _model(dim))
    rng = np.random.default_rng(0)
    rows = _rows(n, dim, rng)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        store.upsert(rows[i:i + batch])
    dt = time.perf_counter() - t0
    return {"part": "append", "rows": n, "dim": dim, "batch": batch, "seconds": round(dt, 2),
            "rows_per_s": round(n / dt), "count": store.count()}


SESSION_ROWS = 5000  # rows per session in the search table: 833 one-second windows x 6 modalities
CONCEPTS = 512  # what a scene can show; a session shows a new one every 30 windows
FILTERS = ("session", "modality", "session+modality")


class _Corpus:
    """The search table's rows, made in order and reproducibly: sessions of SESSION_ROWS rows (one
    window's six modalities after another), each window near the concept its 30-window scene
    shows, offset by its modality, plus noise; queries near a random concept, each with one
    filter a user would pass (one session, one modality, or both)."""

    def __init__(self, dim: int, queries: int, sessions: int) -> None:
        rng = np.random.default_rng(2)
        self.dim, self.sessions = dim, sessions
        self.concepts = rng.standard_normal((CONCEPTS, dim)).astype(np.float32)
        self.offsets = rng.standard_normal((6, dim)).astype(np.float32)
        qv = self.concepts[rng.integers(0, CONCEPTS, queries)] + 0.9 * rng.standard_normal((queries, dim)).astype(np.float32)
        self.queries = qv / np.linalg.norm(qv, axis=1, keepdims=True)
        self.filters = [(FILTERS[k % 3], int(rng.integers(0, sessions)), int(rng.integers(0, 6))) for k in range(queries)]
        self._best: list[list] = [[] for _ in range(queries)]

    def batch(self, start: int, n: int) -> pa.Table:
        """Rows ``start`` .. ``start + n`` as an Arrow table; folds them into the exact top 10s."""
        i = np.arange(start, start + n)
        s, w, m = i // SESSION_ROWS, (i % SESSION_ROWS) // 6, i % 6
        c = (s * 1000 + w // 30) * 2654435761 % CONCEPTS
        noise = np.random.default_rng(start + 7).standard_normal((n, self.dim)).astype(np.float32)
        v = self.concepts[c] + 0.3 * self.offsets[m] + 0.7 * noise
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        self._fold(v, s, m, w)
        cols = {"model": ["bench"] * n, "session": [f"s{x}" for x in s], "stream": ["cam"] * n,
                "modality": [MODALITIES[x] for x in m], "window": w, "t_start": w.astype(float), "t_end": w + 1.0,
                "dim": [self.dim] * n, "t_publish": [0.0] * n, "run_id": ["bench"] * n,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), self.dim)}
        return pa.table(cols, schema=embeddings_schema(self.dim))

    def _fold(self, v: np.ndarray, s: np.ndarray, m: np.ndarray, w: np.ndarray) -> None:
        scores = v @ self.queries.T
        for k, (kind, qs, qm) in enumerate(self.filters):
            mask = (s == qs) if kind == "session" else (m == qm) if kind == "modality" else (s == qs) & (m == qm)
            idx = np.nonzero(mask)[0]
            top = idx[np.argsort(-scores[idx, k])[:10]]
            found = [(float(scores[x, k]), (f"s{s[x]}", MODALITIES[m[x]], int(w[x]))) for x in top]
            self._best[k] = sorted(self._best[k] + found, reverse=True)[:10]

    def truth(self, k: int) -> set:
        return {key for _, key in self._best[k]}

    def filter(self, k: int) -> dict:
        kind, s, m = self.filters[k]
        return {"session": [f"s{s}"] if "session" in kind else [],
                "modality": [MODALITIES[m]] if "modality" in kind else []}


def _ms(xs: list[float], p: float) -> float:
    return round(float(np.percentile(xs, p)) * 1000, 1) if xs else float("nan")


def _run_queries(store: EmbeddingStore, corpus: _Corpus, ks: list[int], **kw) -> dict:
    """Latency p50/p95 and recall@10 against the exact top 10, overall and per filter kind."""
    lat: dict[str, list] = {f: [] for f in FILTERS}
    rec: dict[str, list] = {f: [] for f in FILTERS}
    for k in ks:
        t0 = time.perf_counter()
        hits = store.nearest(corpus.queries[k], limit=10, filters=corpus.filter(k), **kw)
        kind = corpus.filters[k][0]
        lat[kind].append(time.perf_counter() - t0)
        rec[kind].append(len({(h["session"], h["modality"], h["window"]) for h in hits} & corpus.truth(k)) / 10)
    every = sum(lat.values(), [])
    out = {"p50_ms": _ms(every, 50), "p95_ms": _ms(every, 95), "recall_at_10": round(float(np.mean(sum(rec.values(), []))), 3)}
    for f in FILTERS:
        if lat[f]:
            out[f] = {"p50_ms": _ms(lat[f], 50), "p95_ms": _ms(lat[f], 95), "recall_at_10": round(float(np.mean(rec[f])), 3)}
    return out


def bench_search(root: Path, n: int, dim: int, queries: int, nprobes: list[int]) -> dict:
    """``n`` rows written in appends of 50,000 (LanceDB ``add``: the keys are new), the store's
    ``maintain()`` (scalar indexes, then the vector index), the queries through ``nearest()``."""
    corpus = _Corpus(dim, queries, max(1, n // SESSION_ROWS))
    store = EmbeddingStore.create(str(root / "search"), _model(dim))
    t0 = time.perf_counter()
    for i in range(0, n, 50_000):
        store.table.add(corpus.batch(i, min(50_000, n - i)))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.maintain(ann_min_rows=10**12)  # scalar indexes only
    scalar_s = time.perf_counter() - t0
    ks = list(range(queries))
    exact = _run_queries(store, corpus, [k for k in ks if corpus.filters[k][0] != "modality"][:20] +
                         [k for k in ks if corpus.filters[k][0] == "modality"][:5], exact=True)
    t0 = time.perf_counter()
    store.maintain(ann_min_rows=1)  # the vector index, as past store.ann_min_rows
    index_s = time.perf_counter() - t0
    out = {"part": "search", "rows": n, "dim": dim, "sessions": corpus.sessions, "queries": queries,
           "load_s": round(load_s, 1), "scalar_index_s": round(scalar_s, 1), "vector_index_s": round(index_s, 1),
           "exact_scan": exact, "index": {"default_nprobes": store.nprobes(), **_run_queries(store, corpus, ks)}}
    for npb in nprobes:
        out[f"nprobes_{npb}"] = _run_queries(store, corpus, ks, nprobes=npb)
    return out


def bench_live_hour(root: Path, writes: int, dim: int, every: int) -> dict:
    store = EmbeddingStore.create(str(root / "live"), _model(dim))
    rng = np.random.default_rng(3)
    most = 0
    t0 = time.perf_counter()
    for i in range(writes):
        store.upsert(_rows(6, dim, rng, start=6 * i, sessions=1))
        most = max(most, store.fragments())
        if (i + 1) % every == 0:
            store.maintain()
    return {"part": "live_hour", "writes": writes, "rows": store.count(), "maintain_every_writes": every,
            "fragments_end": store.fragments(), "fragments_max": most, "seconds": round(time.perf_counter() - t0, 1)}


def _pipeline_once(session: Path, store_uri: str | None) -> tuple[float, int]:
    from pipeline.config import parse_config
    from pipeline.run import run

    cfg = parse_config({"sessions": [str(session)], "replay": {"rate": 0},
                        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32"},
                        "publish": {"endpoint": "tcp://127.0.0.1:*"}, "progress": False, "store": {"uri": store_uri}})
    ready: list[float] = []
    result = run(cfg, on_ready=lambda endpoint: ready.append(time.time()))
    assert result.exit_code == 0, result.sessions
    rows = result.sessions[0].get("store", {}).get("rows", 0) if store_uri else 0
    return result.sessions[0]["windows"] / (time.time() - ready[0]), rows


def bench_pipeline(root: Path, seconds: float, pairs: int) -> dict:
    """The demo session through the Ray graph at ``replay.rate: 0`` (imagebind_tiny, random
    weights), store off then on, ``pairs`` times: windows/s from the graph's ready to the end
    (with the store on that includes the session's ``end`` waiting for its rows)."""
    import ray

    from sources.demo import write_demo_session

    session = write_demo_session(root / "demo", seconds=seconds)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    off, on, rows = [], [], []
    try:
        for i in range(pairs):
            off.append(_pipeline_once(session, None)[0])
            rate, n = _pipeline_once(session, str(root / f"pipeline-store-{i}"))
            on.append(rate)
            rows.append(n)
    finally:
        ray.shutdown()
    ratios = [b / a for a, b in zip(off, on)]
    return {"part": "pipeline", "seconds": seconds, "pairs": [[round(a, 1), round(b, 1)] for a, b in zip(off, on)],
            "store_rows": rows, "off_median": round(float(np.median(off)), 1), "on_median": round(float(np.median(on)), 1),
            "ratio_of_medians": round(float(np.median(on) / np.median(off)), 3),
            "pair_ratios": [round(r, 3) for r in ratios]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="vectors in the search table (default 100000)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--append-rows", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=150, help="search queries, a third per filter kind")
    ap.add_argument("--nprobes", default="", help="also query with these nprobes (comma-separated)")
    ap.add_argument("--hour-writes", type=int, default=3600)
    ap.add_argument("--pairs", type=int, default=3, help="store off/on pipeline runs (default 3)")
    ap.add_argument("--seconds", type=float, default=20.0, help="demo session length for the pipeline part")
    ap.add_argument("--root", default=None, help="folder for the stores (default: a temporary folder, deleted)")
    ap.add_argument("--parts", default="append,live_hour,pipeline,search")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        parts = args.parts.split(",")
        if "append" in parts:
            print(json.dumps(bench_append(root, args.append_rows, args.dim, args.batch)), flush=True)
        if "live_hour" in parts:
            print(json.dumps(bench_live_hour(root, args.hour_writes, args.dim, 60)), flush=True)
        if "pipeline" in parts:
            print(json.dumps(bench_pipeline(root, args.seconds, args.pairs)), flush=True)
        if "search" in parts:
            nprobes = [int(x) for x in args.nprobes.split(",") if x]
            print(json.dumps(bench_search(root, args.rows, args.dim, args.queries, nprobes)), flush=True)


if __name__ == "__main__":
    main()
