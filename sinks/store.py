"""The embedding store: every published embedding kept in a LanceDB table, searchable.

Layout of a store (a folder, or an object-storage URI LanceDB accepts), docs/store.md:

* table ``embeddings``: one row per (model, session, modality, window) -- the key. Writing a
  row whose key is already there replaces it (LanceDB ``merge_insert``), so replaying a
  session again, or a restarted actor sending a window twice, never duplicates a row.
* table ``models``: one row per model name, what a query needs to rebuild the model (config,
  checkpoint, seed, precision) and its dimension.
* tables ``thumbnails``, ``captions``, ``events`` (sinks/store_tables.py): a JPEG per vision
  window, the text of each text window with a caption, one row per trigger event; upserts on
  their own keys.

:class:`EmbeddingStore` opens or creates a store and reads and writes it directly.
:class:`StoreWriter` is the sink: rows are queued by :meth:`StoreWriter.add` (never waits on the
disk) and written in batches by one background thread, rows of every table in the same batches; a
store that cannot be written fails the writer (:attr:`StoreWriter.error`) and every row from then
on is counted as not written, per table and session.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa

from sinks.protocol import EmbeddingRecord
from sinks.store_tables import CAPTIONS, EVENTS, TABLE_KEYS, TABLE_SCHEMAS, THUMBNAILS, EventPairer, arrow_rows

__all__ = ["ANN_MIN_ROWS", "CAPTIONS", "EMBEDDINGS", "EVENTS", "EXACT_MAX_ROWS", "KEY", "MODELS", "THUMBNAILS",
           "EmbeddingStore", "StoreError", "StoreRow", "StoreWriter", "embeddings_schema", "where_clause"]

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
MODELS = "models"
KEY = ("model", "session", "modality", "window")
# Below this many rows a filtered top-k is an exact scan (recall 1, tens of ms at 1024-d on
# two cores, bench/store.py); from here on an IVF_SQ index (8-bit scalar-quantized vectors in
# partitions of about ROWS_PER_PARTITION rows) keeps it fast. IVF_SQ, because on two cores it
# builds in minutes at 1,000,000 rows, where IVF_HNSW_SQ had not finished at 100,000 after 400 s
# and IVF_PQ took 4 minutes at 200,000 for recall@10 0.80 (bench/RESULTS.md).
ANN_MIN_ROWS = 100_000
ROWS_PER_PARTITION = 4096
# An indexed query probes this share of the partitions and re-ranks REFINE_FACTOR x limit
# candidates on the full vectors. At 1,000,000 rows (about 270 partitions) and a modality-wide
# filter: 32 probes gave recall@10 1.0 and p95 31 ms, 16 as low as 0.97, 68 a p95 of 59 ms
# (bench/RESULTS.md).
PROBE_SHARE = 0.125
MIN_NPROBES = 20
REFINE_FACTOR = 10
VECTOR_INDEX = "vector_idx"
# A filter matching at most this many rows (one session, say) is answered by an exact scan of
# those rows, found through the scalar indexes: as fast as the index there, and recall 1 where
# the index's partitions hold few of the filter's rows.
EXACT_MAX_ROWS = 8192


class StoreError(RuntimeError):
    """The store cannot be opened, created or written; the message names the URI and why."""


def embeddings_schema(dim: int) -> pa.Schema:
    """The ``embeddings`` table's schema for vectors of ``dim`` float32 values."""
    return pa.schema([
        ("model", pa.string()), ("session", pa.string()), ("stream", pa.string()), ("modality", pa.string()),
        ("window", pa.int64()), ("t_start", pa.float64()), ("t_end", pa.float64()), ("dim", pa.int32()),
        ("vector", pa.list_(pa.float32(), dim)), ("t_publish", pa.float64()), ("run_id", pa.string()),
    ])


_MODELS_SCHEMA = pa.schema([("model", pa.string()), ("dim", pa.int32()), ("config", pa.string()),
                            ("checkpoint", pa.string()), ("seed", pa.int64()), ("precision", pa.string())])


@dataclass(frozen=True)
class StoreRow:
    """One embedding as the store keeps it (``vector``: 1-D, any float dtype; stored as float32)."""

    model: str
    session: str
    stream: str
    modality: str
    window: int
    t_start: float
    t_end: float
    vector: np.ndarray
    t_publish: float
    run_id: str = ""
    table = EMBEDDINGS


def _rows_table(rows: list[StoreRow], dim: int) -> pa.Table:
    """``rows`` as an Arrow table, the last row of each key kept (a merge must not see a key twice)."""
    last: dict[tuple, StoreRow] = {}
    for r in rows:
        last[(r.model, r.session, r.modality, r.window)] = r
    rows = list(last.values())
    vec = np.stack([np.asarray(r.vector, dtype=np.float32).reshape(-1) for r in rows]) if rows else np.zeros((0, dim), "f4")
    if vec.shape[1] != dim:
        raise StoreError(f"embedding of {vec.shape[1]} values, the store's table holds dim {dim}")
    cols = {name: [getattr(r, name) for r in rows] for name in
            ("model", "session", "stream", "modality", "window", "t_start", "t_end", "t_publish", "run_id")}
    cols["dim"] = [dim] * len(rows)
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), pa.float32()), dim)
    return pa.table(cols, schema=embeddings_schema(dim))


def _where(filters: Mapping[str, Iterable[str]], between: tuple[float, float] | None) -> str | None:
    """An SQL filter: each key in one of its values, and the window inside ``between``."""
    parts = []
    for col, values in filters.items():
        values = list(values)
        if values:
            quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
            parts.append(f"{col} IN ({quoted})")
    if between is not None:
        parts.append(f"t_end >= {float(between[0])!r} AND t_start <= {float(between[1])!r}")
    return " AND ".join(parts) or None


def where_clause(filters: Mapping[str, Iterable[Any]], between: tuple[float, float] | None = None) -> str | None:
    """The SQL filter :meth:`EmbeddingStore.read` takes: each column in one of its values (no
    values: any), and the window overlapping ``between`` (session-clock seconds)."""
    return _where(filters, between)


class EmbeddingStore:
    """A store at ``uri``. :meth:`open` an existing one (reading), :meth:`create` one for a
    model (writing). :attr:`table` is the LanceDB table for anything else."""

    def __init__(self, uri: str, db: Any, table: Any, dim: int) -> None:
        self.uri = uri
        self._db = db
        self.table = table
        self.dim = dim
        self._tables: dict[str, Any] = {}  # thumbnails, captions, events: opened or created on their first rows
        self._partitions: tuple[int, int | None] | None = None  # (table version, the index's partitions)

    @classmethod
    def open(cls, uri: str) -> "EmbeddingStore":
        """An existing store; :class:`StoreError` if ``uri`` holds none."""
        import lancedb

        try:
            db = lancedb.connect(str(uri))
            names = set(db.list_tables().tables)
            if EMBEDDINGS not in names:
                raise StoreError(f"store {uri}: not a bindstream store (no '{EMBEDDINGS}' table); "
                                 "a run with store.uri set, or `python -m pipeline store`, makes one")
            table = db.open_table(EMBEDDINGS)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"store {uri}: cannot open it: {_short(exc)}") from None
        return cls(str(uri), db, table, _vector_dim(table.schema))

    @classmethod
    def create(cls, uri: str, model: Mapping[str, Any]) -> "EmbeddingStore":
        """The store at ``uri``, created if missing, ready for ``model``'s rows (``model``: name,
        dim, config, checkpoint, seed, precision). A table of another dimension is an error."""
        import lancedb

        dim = int(model["dim"])
        try:
            db = lancedb.connect(str(uri))
            if EMBEDDINGS in set(db.list_tables().tables):
                table = db.open_table(EMBEDDINGS)
            else:
                table = db.create_table(EMBEDDINGS, schema=embeddings_schema(dim), exist_ok=True)
            have = _vector_dim(table.schema)
            if have != dim:
                raise StoreError(f"store {uri}: its '{EMBEDDINGS}' table holds vectors of dim {have}, model "
                                 f"{model['model']} makes dim {dim}; use another store.uri for this model")
            models = db.create_table(MODELS, schema=_MODELS_SCHEMA, exist_ok=True)
            row = {"model": str(model["model"]), "dim": dim, "config": _config_text(model.get("config")),
                   "checkpoint": str(model.get("checkpoint", "auto")), "seed": int(model.get("seed", 0)),
                   "precision": str(model.get("precision", "fp32"))}
            models.merge_insert("model").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist([row], schema=_MODELS_SCHEMA))
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"store {uri}: cannot create or open it for writing: {_short(exc)}") from None
        return cls(str(uri), db, table, dim)

    def models(self) -> list[dict[str, Any]]:
        """The ``models`` table's rows (what a query needs to rebuild each model)."""
        if MODELS not in set(self._db.list_tables().tables):
            return []
        return self._db.open_table(MODELS).to_arrow().to_pylist()

    def read(self, table: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Rows of ``table`` matching ``where`` (an SQL filter, e.g. :func:`where_clause`), only
        ``columns`` (all when ``None``). A table the store does not have reads as no rows."""
        if table not in set(self._db.list_tables().tables):
            return pa.table({c: pa.array([], pa.null()) for c in columns or []})
        q = (self.table if table == EMBEDDINGS else self._db.open_table(table)).search()
        if where:
            q = q.where(where)
        if columns is not None:
            q = q.select(list(columns))
        return q.limit(None).to_arrow()

    def upsert(self, rows: list[StoreRow]) -> int:
        """Write ``rows``, replacing those whose key is there; returns the rows written."""
        if not rows:
            return 0
        data = _rows_table(rows, self.dim)
        (self.table.merge_insert(list(KEY)).when_matched_update_all().when_not_matched_insert_all()
         .execute(data))
        return data.num_rows

    def upsert_rows(self, name: str, rows: list[Any]) -> int:
        """Write ``rows`` of table ``name`` (thumbnails, captions or events; created on the first
        rows), replacing those whose key is there; returns the rows written."""
        if not rows:
            return 0
        data = arrow_rows(name, rows)
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = self._db.create_table(name, schema=TABLE_SCHEMAS[name], exist_ok=True)
        table.merge_insert(list(TABLE_KEYS[name])).when_matched_update_all().when_not_matched_insert_all().execute(data)
        return data.num_rows

    def count(self, where: str | None = None) -> int:
        return int(self.table.count_rows(where))

    def fragments(self) -> int:
        return int(self.table.stats()["fragment_stats"]["num_fragments"])

    def nprobes(self) -> int:
        """Partitions an indexed query probes: PROBE_SHARE of the vector index's, at least
        MIN_NPROBES (LanceDB probes all where there are fewer)."""
        return max(MIN_NPROBES, math.ceil(PROBE_SHARE * (self.index_partitions() or 0)))

    def index_partitions(self) -> int | None:
        """The vector index's partitions, None without one (read once per table version): Lance
        sets the count itself as it builds and optimizes, so it is read, not assumed."""
        version = self.table.version
        if self._partitions is None or self._partitions[0] != version:
            parts = None
            if any(list(i.columns) == ["vector"] for i in self.table.list_indices()):
                os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # only the counts are read
                stats = self.table.to_lance().stats.index_stats(VECTOR_INDEX)
                parts = max(int(seg["num_partitions"]) for seg in stats["indices"])
            self._partitions = (version, parts)
        return self._partitions[1]

    def nearest(self, vector: np.ndarray, *, limit: int, filters: Mapping[str, Iterable[str]] | None = None,
                between: tuple[float, float] | None = None, exact: bool = False,
                nprobes: int | None = None) -> list[dict[str, Any]]:
        """The ``limit`` rows nearest ``vector`` (cosine), filtered first, each with ``score``
        (cosine similarity) and without the vector. ``exact`` skips the vector index; ``nprobes``
        overrides :meth:`nprobes`."""
        q = self.table.search(np.asarray(vector, dtype=np.float32).reshape(-1)).metric("cosine")
        where = _where(filters or {}, between)
        if where:
            q = q.where(where, prefilter=True)
        if exact or (where is not None and self.count(where) <= EXACT_MAX_ROWS):
            q = q.bypass_vector_index()
        else:  # without an index LanceDB scans exactly and ignores these
            q = q.nprobes(nprobes or self.nprobes()).refine_factor(REFINE_FACTOR)
        cols = ["model", "session", "stream", "modality", "window", "t_start", "t_end"]
        out = q.select(cols + ["_distance"]).limit(int(limit)).to_arrow().to_pylist()
        for row in out:
            row["score"] = 1.0 - float(row.pop("_distance"))
        return out

    def maintain(self, *, ann_min_rows: int = ANN_MIN_ROWS) -> None:
        """Indexes and compaction: scalar indexes on model, session, modality and t_start once
        there are rows, an IVF_SQ vector index once the table has ``ann_min_rows`` rows, then
        ``optimize()`` (merges small fragments, adds new rows to the indexes, and splits the
        vector index's partitions that grew too large)."""
        from lancedb.index import BTree, Bitmap, IvfSq

        n = self.count()
        if n == 0:
            return
        have = {tuple(i.columns) for i in self.table.list_indices()}
        for col, kind in (("model", Bitmap()), ("session", Bitmap()), ("modality", Bitmap()), ("t_start", BTree())):
            if (col,) not in have:
                self.table.create_index(col, config=kind)
        if n >= ann_min_rows and ("vector",) not in have:
            self.table.create_index("vector", config=IvfSq(distance_type="cosine",
                                                           num_partitions=max(1, n // ROWS_PER_PARTITION)),
                                    name=VECTOR_INDEX)
        self.table.optimize()
        for table in self._tables.values():
            table.optimize()


def _vector_dim(schema: pa.Schema) -> int:
    return int(schema.field("vector").type.list_size)


def _config_text(config: Any) -> str:
    return config if isinstance(config, str) else json.dumps(config, sort_keys=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class StoreWriter:
    """The store sink: :meth:`add` queues rows (bounded, never waits on the disk); one
    background thread writes them in batches of up to ``batch_rows`` at least every ``flush_s``
    seconds, and runs :meth:`EmbeddingStore.maintain` every ``optimize_every_s``.

    The first failure (the store cannot be created, a write fails) ends writing: :attr:`error`
    says why and every row queued or added afterwards is counted as not written, per table and
    session. Rows beyond ``max_pending_rows`` waiting are not written either (the disk fell behind).

    Besides embeddings (:meth:`add_published`) it takes rows of the other tables (:meth:`add`:
    :class:`sinks.store_tables.ThumbnailRow`, ``CaptionRow``, ``EventRow``) and trigger events
    (:meth:`add_events`, paired into ``events`` rows by a :class:`sinks.store_tables.EventPairer`).
    """

    def __init__(self, uri: str, model: Mapping[str, Any], *, batch_rows: int = 1024, flush_s: float = 1.0,
                 max_pending_rows: int = 100_000, optimize_every_s: float = 60.0, ann_min_rows: int = ANN_MIN_ROWS,
                 run_id: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = str(uri)
        self.run_id = str(run_id)
        self._model = dict(model)
        self._batch_rows, self._flush_s = int(batch_rows), float(flush_s)
        self._max_pending, self._optimize_every_s = int(max_pending_rows), float(optimize_every_s)
        self._ann_min_rows = int(ann_min_rows)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: collections.deque[Any] = collections.deque()  # rows of any table (their ``table``)
        self._busy = 0  # rows taken by the thread, not yet written or failed
        self._closing = False
        self._flushing = False  # flush() asked for the rows to be written now
        self.error: str | None = None
        self.written: collections.Counter[tuple[str, str]] = collections.Counter()  # (table, session) -> rows written
        self.not_written: collections.Counter[tuple[str, str]] = collections.Counter()  # (table, session) -> rows lost
        self._pairer = EventPairer(self.run_id)
        self._store: EmbeddingStore | None = None
        import lancedb  # noqa: F401  (seconds of GIL-holding import: here, not in the thread while rows flow)

        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def add(self, rows: Iterable[Any]) -> None:
        """Queue ``rows`` (a :class:`StoreRow` or a row of sinks/store_tables.py each); returns at once."""
        with self._cond:
            for r in rows:
                if self.error is not None or len(self._pending) >= self._max_pending:
                    self.not_written[r.table, r.session] += 1
                    if self.error is None:
                        self._fail(f"store {self.uri}: writes fell {self._max_pending} rows behind")
                else:
                    self._pending.append(r)
            if len(self._pending) >= self._batch_rows:
                self._cond.notify_all()

    def add_published(self, batch: list[tuple[EmbeddingRecord, str, float]]) -> None:
        """Queue a publisher's batch (:attr:`sinks.base.SinkBase.on_publish`); returns at once."""
        self.add(StoreRow(model, r.session, r.stream, r.modality, int(r.window), float(r.t_start), float(r.t_end),
                          r.embedding, t_publish, self.run_id) for r, model, t_publish in batch)

    def add_events(self, session: str, model: str, events: Iterable[Any]) -> None:
        """Queue the ``events`` rows of trigger events of ``session`` as published (each a
        ``start`` or ``end``, :meth:`sinks.store_tables.EventPairer.add`); returns at once."""
        with self._cond:
            rows = self._pairer.add(session, model, events)
        self.add(rows)

    def end_session(self, session: str) -> None:
        """``session`` ended: its events still open are queued as far as they are known."""
        with self._cond:
            rows = self._pairer.end_session(session)
        self.add(rows)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every row added so far is written or counted lost; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def report(self, session: str) -> dict[str, Any]:
        """``session``'s ``embeddings`` rows: ``rows`` written, ``not_written``, ``pending``; the
        same per other table that has any in ``tables`` (table -> counts); ``error``."""
        with self._cond:
            pending = collections.Counter(r.table for r in self._pending if r.session == session)
            counts = {t: {"rows": self.written[t, session], "not_written": self.not_written[t, session],
                          "pending": pending[t]} for t in (EMBEDDINGS, THUMBNAILS, CAPTIONS, EVENTS)}
            out: dict[str, Any] = {"uri": self.uri, **counts.pop(EMBEDDINGS)}
            tables = {t: c for t, c in counts.items() if any(c.values())}
            if tables:
                out["tables"] = tables
            if self.error is not None:
                out["error"] = self.error
            return out

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued (up to ``timeout_s``), compact, and stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- the writer thread ----------------------------------------------------------------------

    def _fail(self, error: str) -> None:
        """Called with the lock held: the first error ends writing; what waits is lost."""
        if self.error is None:
            self.error = error
            log.error("%s; the run keeps publishing, the rows are not stored", error)
        for r in self._pending:
            self.not_written[r.table, r.session] += 1
        self._pending.clear()

    def _run(self) -> None:
        try:
            store = EmbeddingStore.create(self.uri, self._model)
        except StoreError as exc:
            with self._cond:
                self._fail(str(exc))
            return
        self._store = store
        last_maintain = self._clock()
        while True:
            with self._cond:
                self._wait_for_batch()
                if self._closing and not self._pending:
                    break
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._batch_rows))]
                self._busy = len(batch)
                self._flushing = self._flushing and bool(self._pending)
            if not batch:
                continue
            self._write(store, batch)
            if self._clock() - last_maintain >= self._optimize_every_s and self.error is None:
                last_maintain = self._clock()
                self._maintain(store)
        if self.error is None:
            self._maintain(store)

    def _wait_for_batch(self) -> None:
        """With the lock held: until ``batch_rows`` rows wait, or the oldest waited ``flush_s``,
        or a flush or close is asked for."""
        since = time.monotonic()
        while not (self._closing or self._flushing or len(self._pending) >= self._batch_rows):
            if not self._pending:
                since = time.monotonic()
            left = since + self._flush_s - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _write(self, store: EmbeddingStore, batch: list[Any]) -> None:
        """One upsert per table in ``batch``; from the first that fails on, its rows and the rest are lost."""
        by_table: dict[str, list[Any]] = {}
        for r in batch:
            by_table.setdefault(r.table, []).append(r)
        error = None
        for table, rows in by_table.items():
            ok = error is None
            if ok:
                try:
                    store.upsert(rows) if table == EMBEDDINGS else store.upsert_rows(table, rows)
                except Exception as exc:
                    error, ok = f"store {self.uri}: writing {len(rows)} {table} rows failed: {_short(exc)}", False
            with self._cond:
                for r in rows:
                    (self.written if ok else self.not_written)[table, r.session] += 1
        with self._cond:
            if error:
                self._fail(error)
            self._busy = 0
            self._cond.notify_all()

    def _maintain(self, store: EmbeddingStore) -> None:
        try:
            store.maintain(ann_min_rows=self._ann_min_rows)
        except Exception as exc:  # the rows are written; an index or a compaction can wait for the next turn
            log.warning("store %s: indexing or compaction failed: %s", self.uri, _short(exc))
