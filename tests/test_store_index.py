"""The store's vector index on a real LanceDB folder: once built, a filtered top-k through it
returns what an exact scan returns, and the row a query was made from comes first."""

from __future__ import annotations

import numpy as np

from sinks.store import EXACT_MAX_ROWS, EmbeddingStore, StoreRow

DIM = 16


def _store(tmp_path, n: int) -> tuple[EmbeddingStore, np.ndarray]:
    store = EmbeddingStore.create(str(tmp_path / "store"), {"model": "m", "dim": DIM})
    vec = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    store.upsert([StoreRow("m", f"s{i % 2}", "cam", "vision" if i % 10 else "audio", i, float(i), i + 1.0, vec[i], 0.0)
                  for i in range(n)])
    return store, vec


def test_filtered_search_through_the_index_returns_what_an_exact_scan_returns(tmp_path):
    n = EXACT_MAX_ROWS + 4000  # the vision filter matches more rows than an exact answer takes
    store, vec = _store(tmp_path, n)
    store.maintain(ann_min_rows=n)
    assert store.index_partitions() is not None, "no vector index at ann_min_rows"
    for i in (1, 2345, n - 1):
        got = store.nearest(vec[i], limit=10, filters={"modality": ["vision"], "model": ["m"]})
        exact = store.nearest(vec[i], limit=10, filters={"modality": ["vision"], "model": ["m"]}, exact=True)
        assert got[0]["window"] == i and abs(got[0]["score"] - 1.0) < 1e-3
        assert len({h["window"] for h in got} & {h["window"] for h in exact}) >= 9
        narrow = store.nearest(vec[i], limit=10, filters={"session": [f"s{i % 2}"], "modality": ["vision"]},
                               between=(i - 500.0, i + 500.0))
        assert narrow[0]["window"] == i and all(abs(h["window"] - i) <= 501 for h in narrow)
