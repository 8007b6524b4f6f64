"""The embedding store (sinks/store.py) on its own: append rate, filtered top-k search latency and
recall against exact search, fragments after a simulated hour of live appends.

    python bench/store.py [--rows 100000] [--dim 1024] [--append-rows 50000] [--hour-writes 3600]

* append: ``EmbeddingStore.upsert`` (LanceDB ``merge_insert`` on the key) of ``--append-rows``
  1024-d rows in batches of ``store.batch_rows`` (1024) into a growing table: rows/s.
* search: a table of ``--rows`` unit vectors (clustered, 20 sessions, 6 modalities), queries
  filtered by one session and one modality (filter first, LanceDB's default), top 10: p50/p95
  latency of exact search, then with the index the store builds past ``store.ann_min_rows``
  (IVF_HNSW_SQ, cosine), and its recall@10 against the exact results.
* live hour: ``--hour-writes`` small writes (6 rows each: one window of six modalities per
  second), ``maintain()`` (indexes + ``optimize()``) every 60 writes as ``store.optimize_every_s``
  does: fragments at the end, and the most seen.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, not bench/

from sinks.store import EmbeddingStore, StoreRow  # noqa: E402

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


def _queries(store: EmbeddingStore, rng: np.random.Generator, n: int, dim: int, *, exact: bool) -> tuple[list, list]:
    lat, results = [], []
    rng = np.random.default_rng(1)
    for _ in range(n):
        q = rng.standard_normal(dim).astype(np.float32)
        f = {"session": [f"s{rng.integers(0, 20)}"], "modality": [MODALITIES[rng.integers(0, 6)]]}
        t0 = time.perf_counter()
        hits = store.nearest(q, limit=10, filters=f, exact=exact)
        lat.append(time.perf_counter() - t0)
        results.append({(h["session"], h["modality"], h["window"]) for h in hits})
    return lat, results


def bench_search(root: Path, n: int, dim: int, queries: int) -> dict:
    store = EmbeddingStore.create(str(root / "search"), _model(dim))
    rng = np.random.default_rng(2)
    for i in range(0, n, 10_000):
        store.upsert(_rows(min(10_000, n - i), dim, rng, start=i))
    t0 = time.perf_counter()
    store.maintain(ann_min_rows=10**12)  # scalar indexes only
    scalar_s = time.perf_counter() - t0
    lat_exact, exact = _queries(store, rng, queries, dim, exact=True)
    t0 = time.perf_counter()
    store.maintain(ann_min_rows=1)  # the vector index, as past store.ann_min_rows
    index_s = time.perf_counter() - t0
    lat_ann, ann = _queries(store, rng, queries, dim, exact=False)
    recall = float(np.mean([len(a & e) / max(1, len(e)) for a, e in zip(ann, exact)]))
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 1)  # noqa: E731
    return {"part": "search", "rows": n, "dim": dim, "queries": queries, "filter": "one session and one modality",
            "scalar_index_s": round(scalar_s, 1), "vector_index_s": round(index_s, 1),
            "exact_p50_ms": ms(lat_exact, 50), "exact_p95_ms": ms(lat_exact, 95),
            "ann_p50_ms": ms(lat_ann, 50), "ann_p95_ms": ms(lat_ann, 95), "recall_at_10": round(recall, 3)}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="vectors in the search table (default 100000)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--append-rows", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--hour-writes", type=int, default=3600)
    ap.add_argument("--parts", default="append,search,live_hour")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = args.parts.split(",")
        if "append" in parts:
            print(json.dumps(bench_append(root, args.append_rows, args.dim, args.batch)), flush=True)
        if "search" in parts:
            print(json.dumps(bench_search(root, args.rows, args.dim, args.queries)), flush=True)
        if "live_hour" in parts:
            print(json.dumps(bench_live_hour(root, args.hour_writes, args.dim, 60)), flush=True)


if __name__ == "__main__":
    main()
