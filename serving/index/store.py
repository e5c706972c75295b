"""The vector index (docs/FORMATS.md section 5): SQLite (WAL) is the source of truth, FAISS a cache.

Why this split: an add is acknowledged only once SQLite has committed it, so a crash never loses an
acknowledged item; the FAISS file may lag behind and is rebuilt from SQLite whenever it is missing,
unreadable or of another ``generation``. Every write bumps ``generation``; a reader that sees a
generation it did not write itself (another process wrote) reloads its FAISS copy from SQLite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.core.files import atomic_write, atomic_write_text
from corinfomax.serving.index import kinds
from corinfomax.serving.index.backend import (
    Hit,
    IndexMismatch,
    Item,
    Labelled,
    check_answer_size,
    check_ids,
    check_k,
    check_key,
    check_rows,
    check_thumbnails,
    normalise,
)

log = logging.getLogger(__name__)

DB_FILE = "index.sqlite"
FAISS_FILE = "faiss.index"
FAISS_META = "faiss.json"

READ_BATCH = 50_000
KEY_TTL_S = 24 * 3600  # a retried write is recognised for a day

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL,
    label TEXT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_label ON items(label) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thumbnails (id INTEGER PRIMARY KEY, image BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS writes (key TEXT PRIMARY KEY, result TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS writes_created ON writes(created_at);
"""


class IndexStore:
    """Open (or create) an index folder; add, delete, get and search unit vectors with metadata.

    Thread-safe within a process (one lock). Several processes may open the same folder: SQLite
    serialises their writes and each process notices the others' writes through ``generation``.
    For serving, one process owns the store and the others call it (see ``serving.service``).

    Args:
        folder: the index folder (created if missing; then ``dim`` is required).
        dim: expected embedding dimension; a folder of another dimension is refused.
        model_sha256: the bundle's ``checkpoint_sha256``; a folder built by another model is refused.
    """

    def __init__(self, folder: str | Path, dim: int | None = None, model_sha256: str | None = None) -> None:
        self.folder = Path(folder)
        self._lock = threading.RLock()
        db_path = self.folder / DB_FILE
        if not db_path.exists():
            if dim is None:
                raise BadInput(f"{self.folder} is not an index (no {DB_FILE}); give the embedding dim to create one")
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():
            raise BadInput(f"index path {self.folder} is not a folder")
        self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged add survives power loss, not only a crash
        # The page cache is the store's only memory besides its vectors (FAISS): it grew to 1.6 MiB under
        # 6,000 rounds of keyed add/delete/search/get. SQLite's default bound, 2 MiB, stated here.
        self._db.execute("PRAGMA cache_size=-2048")
        self._create_or_check(dim, model_sha256)
        self._index: faiss.Index | None = None
        self._meta: dict[str, Any] = {}
        self._tombstones: set[int] = set()  # deleted ids still inside an index that cannot remove (HNSW)
        self._load_cache()

    # -- schema and info ----------------------------------------------------------------------

    def _create_or_check(self, dim: int | None, model_sha256: str | None) -> None:
        with self._write():
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    self._db.execute(statement)
            info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
            if "embedding_dim" not in info:
                if dim is None:
                    raise BadInput(f"index {self.folder} has no embedding_dim; give dim to initialise it")
                self._db.executemany(
                    "INSERT INTO info(key, value) VALUES (?, ?)",
                    [("embedding_dim", str(int(dim))), ("model_sha256", model_sha256 or ""), ("generation", "0")],
                )
                info = {"embedding_dim": str(int(dim)), "model_sha256": model_sha256 or "", "generation": "0"}
        self.dim = int(info["embedding_dim"])
        self.model_sha256 = info.get("model_sha256") or None
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatch(f"index {self.folder} holds {self.dim}-dim vectors, the model makes {dim}-dim ones; "
                                f"use another index folder or rebuild it with this model")
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise IndexMismatch(f"index {self.folder} was built with model {self.model_sha256[:12]}, not "
                                f"{model_sha256[:12]}; its vectors are not comparable: use another index folder")

    def _write(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """First column of the first row, under the lock (one connection is shared by threads)."""
        with self._lock:
            return self._db.execute(sql, params).fetchone()[0]

    def generation(self) -> int:
        return int(self._one("SELECT value FROM info WHERE key='generation'"))

    def _bump(self) -> int:
        self._db.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return self.generation()

    def count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM items"))

    # -- writes -------------------------------------------------------------------------------

    def add(
        self,
        vectors: Any,
        metadata: Sequence[dict[str, Any]] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        key: str | None = None,
    ) -> list[int]:
        """Store vectors (L2-normalised here) with metadata, labels and thumbnails (encoded images, e.g.
        ``core.thumbnails.make_thumbnail``); return their new ids once committed, thumbnails in the same commit.

        With an idempotency ``key`` already used by a committed write, nothing is stored and that write's
        ids come back, so a client (or the service's internal hop) can retry a write it lost the answer to.
        """
        vectors = normalise(vectors, self.dim)
        rows = self._rows(vectors, metadata, labels)
        thumbs = check_thumbnails(thumbnails, len(rows))
        key = check_key(key)
        with self._lock:
            with self._write():
                done = self._done(key)
                if done is not None:
                    return list(done)
                ids = self._insert(rows)
                self._db.executemany("INSERT INTO thumbnails(id, image) VALUES (?, ?)",
                                     [(i, t) for i, t in zip(ids, thumbs) if t is not None])
                self._remember(key, ids)
                generation = self._bump()
            self._sync_after_write(generation, lambda index: index.add_with_ids(vectors, np.asarray(ids, np.int64)))
        return ids

    def add_many(self, batches: Iterable[tuple[Any, Sequence[dict] | None, Sequence[str | None] | None]],
                 rebuild: bool = True) -> int:
        """Bulk path for `corinfomax index build`: one SQLite commit per batch, then one FAISS rebuild.

        Each batch is ``(vectors [n, D], metadata or None, labels or None)``. Returns the rows added.
        """
        total = 0
        with self._lock:
            for vectors, metadata, labels in batches:
                vectors = normalise(vectors, self.dim)
                rows = self._rows(vectors, metadata, labels)
                with self._write():
                    self._insert(rows)
                    self._bump()
                total += len(rows)
            self._index, self._meta = None, {}
            if rebuild:
                self.rebuild()
        return total

    def delete(self, ids: Sequence[int], key: str | None = None) -> list[int]:
        """Delete items by id; all must exist (else NotFound and nothing is deleted). ``key``: as in ``add``."""
        wanted = check_ids(ids)
        key = check_key(key)
        with self._lock:
            with self._write():
                done = self._done(key)
                if done is not None:
                    return list(done)
                present = self._existing(wanted)
                missing = [i for i in wanted if i not in present]
                if missing:
                    raise NotFound(f"no item with id {', '.join(map(str, missing[:10]))}")
                self._db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in wanted])
                self._db.executemany("DELETE FROM thumbnails WHERE id = ?", [(i,) for i in wanted])
                self._remember(key, wanted)
                generation = self._bump()
            self._sync_after_write(generation, lambda index: self._remove(index, wanted))
        return wanted

    @staticmethod
    def _rows(vectors: np.ndarray, metadata: Sequence[dict] | None,
              labels: Sequence[str | None] | None) -> list[tuple[bytes, str, str | None]]:
        return [(vector.tobytes(), text, label) for vector, text, label in check_rows(vectors, metadata, labels)]

    def _insert(self, rows: list[tuple[bytes, str, str | None]]) -> list[int]:
        """Insert with explicit consecutive ids (AUTOINCREMENT never reuses a deleted id)."""
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='items'").fetchone()
        start = (seq[0] if seq else 0) + 1
        now = time.time()
        ids = list(range(start, start + len(rows)))
        self._db.executemany(
            "INSERT INTO items(id, vector, metadata, label, created_at) VALUES (?, ?, ?, ?, ?)",
            [(i, v, m, lab, now) for i, (v, m, lab) in zip(ids, rows)],
        )
        return ids

    def _done(self, key: str | None) -> list[int] | None:
        """The result of the committed write with idempotency ``key``, if any (inside a write transaction)."""
        if key is None:
            return None
        row = self._db.execute("SELECT result FROM writes WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _remember(self, key: str | None, result: list[int]) -> None:
        """Record a write's result under its key (same transaction as the write); forget expired keys."""
        if key is None:
            return
        now = time.time()
        self._db.execute("DELETE FROM writes WHERE created_at < ?", (now - KEY_TTL_S,))
        self._db.execute("INSERT INTO writes(key, result, created_at) VALUES (?, ?, ?)",
                         (key, json.dumps(result), now))

    def _existing(self, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._db.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk))
        return found

    def _remove(self, index: faiss.Index, ids: list[int]) -> None:
        try:
            index.remove_ids(np.asarray(ids, dtype=np.int64))
        except RuntimeError:  # HNSW cannot remove: hide the ids until the next rebuild
            self._tombstones.update(ids)

    def _sync_after_write(self, generation: int, apply: Any) -> None:
        """Apply our own write to the in-memory FAISS copy if it was current just before it."""
        if self._index is not None and self._meta.get("generation") == generation - 1:
            apply(self._index)
            self._meta.update(generation=generation, count=int(self._index.ntotal))
        else:
            self._index = None  # someone else wrote in between: reload lazily

    # -- reads --------------------------------------------------------------------------------

    def get(self, item_id: int) -> Item:
        (item_id,) = check_ids([item_id])
        with self._lock:
            row = self._db.execute("SELECT id, vector, metadata, label FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"no item with id {item_id}")
        return Item(row[0], np.frombuffer(row[1], np.float32).copy(), json.loads(row[2]), row[3])

    def thumbnail(self, item_id: int) -> bytes:
        """The stored thumbnail of an item (NotFound if the item is unknown or was added without one)."""
        (item_id,) = check_ids([item_id])
        with self._lock:
            row = self._db.execute("SELECT image FROM thumbnails WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            self.get(item_id)  # NotFound for an unknown id
            raise NotFound(f"item {item_id} has no thumbnail (it was added as a vector, or with thumbnails off)")
        return bytes(row[0])

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored unit vectors of ``ids`` (NotFound if any is unknown), float32 ``[N, D]``."""
        return np.stack([self.get(i).vector for i in check_ids(ids)])

    def search(self, queries: Any, k: int, labelled_only: bool = False) -> list[list[Hit]]:
        """Top-``k`` stored items by inner product of unit vectors, per query (fewer if the index is smaller)."""
        queries = normalise(queries, self.dim, "query vectors")
        k = check_k(k)
        with self._lock:
            index = self._current_index()
            if index.ntotal == 0:
                return [[] for _ in queries]
            params = self._search_params(labelled_only)
            fetch = min(index.ntotal, k + len(self._tombstones))
            scores, ids = index.search(queries, fetch, params=params) if params else index.search(queries, fetch)
            wanted = {int(i) for i in ids.ravel() if i >= 0 and int(i) not in self._tombstones}
            texts = self._rows_by_id(wanted)
        answer = [[(int(i), float(s)) for s, i in zip(srow, irow) if int(i) in texts][:k]
                  for srow, irow in zip(scores, ids)]
        check_answer_size(sum(len(texts[i][0]) for row in answer for i, _ in row))
        parsed = {i: json.loads(text) for i, (text, _) in texts.items()}
        return [[Hit(i, s, parsed[i], texts[i][1]) for i, s in row] for row in answer]

    def _search_params(self, labelled_only: bool) -> faiss.SearchParameters | None:
        nprobe, ef = self._meta.get("nprobe"), self._meta.get("ef_search")
        selector = None
        if labelled_only:
            selector = faiss.IDSelectorBatch(self.labelled().ids)
        if nprobe:
            return faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector)
        if ef:
            return faiss.SearchParametersHNSW(efSearch=int(ef), sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _rows_by_id(self, ids: set[int]) -> dict[int, tuple[str, str | None]]:
        """Metadata (JSON text) and label of each id."""
        out: dict[int, tuple[str, str | None]] = {}
        for chunk in _chunks(sorted(ids), 900):
            marks = ",".join("?" * len(chunk))
            for i, meta, label in self._db.execute(f"SELECT id, metadata, label FROM items WHERE id IN ({marks})",
                                                   chunk):
                out[i] = (meta, label)
        return out

    def items(self, batch: int) -> Iterator[list[tuple[Item, bytes | None]]]:
        """Every item with its thumbnail (or None), in id order, ``batch`` at a time (for `index migrate`)."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT items.id, vector, metadata, label, image FROM items LEFT JOIN thumbnails USING (id) "
                    "WHERE items.id > ? ORDER BY items.id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(Item(i, np.frombuffer(v, np.float32).copy(), json.loads(m), label),
                    bytes(image) if image is not None else None) for i, v, m, label, image in rows]

    def labelled(self) -> Labelled:
        """All labelled items (for kNN classification), cached until the next write."""
        with self._lock:
            generation = self.generation()
            cached = getattr(self, "_labelled", None)
            if cached is not None and cached[0] == generation:
                return cached[1]
            ids, vectors, labels = [], [], []
            query = "SELECT id, vector, label FROM items WHERE label IS NOT NULL ORDER BY id"
            for i, blob, label in self._db.execute(query):
                ids.append(i)
                vectors.append(np.frombuffer(blob, np.float32))
                labels.append(label)
            result = Labelled(
                np.asarray(ids, np.int64),
                np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32),
                labels,
            )
            self._labelled = (generation, result)
            return result

    def stats(self) -> dict[str, Any]:
        """Size and state of the index, for `info`, `/metrics` and the CLI."""
        with self._lock:
            index = self._current_index()
            labelled = int(self._one("SELECT COUNT(*) FROM items WHERE label IS NOT NULL"))
            return {
                "count": self.count(),
                "labelled": labelled,
                "thumbnails": int(self._one("SELECT COUNT(*) FROM thumbnails")),
                "dim": self.dim,
                "model_sha256": self.model_sha256,
                "generation": self.generation(),
                "kind": self._meta.get("kind"),
                "recall_at_10": self._meta.get("recall_at_10"),
                "nprobe": self._meta.get("nprobe"),
                "ef_search": self._meta.get("ef_search"),
                "faiss_ntotal": int(index.ntotal),
                "pending_deletes": len(self._tombstones),
            }

    # -- the FAISS cache ----------------------------------------------------------------------

    def _current_index(self) -> faiss.Index:
        """The in-memory FAISS copy, reloaded from SQLite if another process wrote since."""
        if self._index is None or self._meta.get("generation") != self.generation():
            self._refill()
        assert self._index is not None
        return self._index

    def _load_cache(self) -> None:
        """Use faiss.index if it reflects the current generation, else refill it from SQLite."""
        meta_path, index_path = self.folder / FAISS_META, self.folder / FAISS_FILE
        try:
            meta = json.loads(meta_path.read_text())
            data = index_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise ValueError(f"{FAISS_FILE} does not match the checksum in {FAISS_META}")
            index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
            if index.d != self.dim or index.ntotal != meta["count"]:
                raise ValueError(f"index has d={index.d}, ntotal={index.ntotal}; faiss.json says count={meta['count']}")
        except FileNotFoundError:
            log.info("index %s: no FAISS cache yet, building it from SQLite", self.folder)
            self.rebuild()
            return
        except Exception as err:  # a corrupt file raises RuntimeError, ValueError, KeyError...
            log.warning("index %s: FAISS cache unreadable (%s); rebuilding it from SQLite", self.folder, err)
            self.rebuild()
            return
        self._index, self._meta = index, meta
        if meta.get("generation") != self.generation():
            log.info("index %s: FAISS cache is stale (generation %s, SQLite %s); refilling",
                     self.folder, meta.get("generation"), self.generation())
            self._refill()

    def _refill(self) -> None:
        """Re-add every SQLite vector to the current index structure (keeps IVF training)."""
        with self._lock:
            if self._index is None or not self._meta.get("kind"):
                self.rebuild()
                return
            index = self._index
            index.reset()
            generation = self.generation()
            for ids, vectors in self._scan():
                index.add_with_ids(vectors, ids)
            self._meta.update(generation=generation, count=int(index.ntotal))
            self._tombstones.clear()

    def rebuild(self, kind: str | None = None, memory_budget_bytes: int | None = None) -> dict[str, Any]:
        """Build a FAISS index from SQLite, measure recall@10, save atomically.

        With ``kind`` None the kinds of `kinds.candidates` are tried in turn until one reaches the recall
        target, so the recall the index reports is one it reaches; an explicit ``kind`` is kept as asked.
        Returns what ``faiss.json`` records: ``generation``, ``count``, ``kind``, ``recall_at_10``,
        and the tuned ``nprobe`` (IVF) or ``ef_search`` (HNSW).
        """
        with self._lock:
            started = time.perf_counter()
            generation, count = self.generation(), self.count()
            tries = [kind] if kind else kinds.candidates(count, self.dim, memory_budget_bytes)
            for kind in tries:
                index, figures = self._build(kind, count)
                if figures["recall_at_10"] >= kinds.RECALL_TARGET or kind == tries[-1]:
                    break
                log.warning("index %s: %s reaches recall@10 %.3f < %.2f; trying the next kind",
                            self.folder, kind, figures["recall_at_10"], kinds.RECALL_TARGET)
            meta: dict[str, Any] = {"generation": generation, "count": int(index.ntotal), "kind": kind, **figures,
                                    "build_seconds": round(time.perf_counter() - started, 3)}
            self._index, self._meta = index, meta
            self._tombstones.clear()
            self.save()
            log.info("index %s: built %s over %d vectors, recall@10 %.3f in %.1fs", self.folder, kind,
                     index.ntotal, meta["recall_at_10"], meta["build_seconds"])
            return dict(meta)

    def _build(self, kind: str, count: int) -> tuple[faiss.Index, dict[str, Any]]:
        """One FAISS index of ``kind``, trained on a sample and filled from SQLite, with its tuned search."""
        try:
            index = faiss.IndexIDMap2(faiss.index_factory(self.dim, kind, faiss.METRIC_INNER_PRODUCT))
        except RuntimeError as err:
            raise BadInput(f"FAISS cannot make an index of kind {kind!r}: {err}") from err
        if not index.is_trained:
            lists = kinds.ivf_lists_of(kind)
            train = self._sample(min(count, max(kinds.TRAIN_PER_LIST * lists, 10_000), kinds.TRAIN_MAX))
            if len(train) < lists:
                raise BadInput(f"kind {kind!r} needs at least {lists} vectors to train; the index has {count}")
            index.train(train)
        for ids, vectors in self._scan():
            index.add_with_ids(vectors, ids)
        return index, self._tune(index, kind)

    def _tune(self, index: faiss.Index, kind: str) -> dict[str, Any]:
        """Recall@10 against exact search on a sample, with nprobe/efSearch raised to the target."""
        queries = self._sample(min(kinds.RECALL_SAMPLE, int(index.ntotal)))
        if len(queries) == 0:
            return {"recall_at_10": 1.0}
        return kinds.tune(index, queries, self._exact_top(queries, 10))

    def _exact_top(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k ids by streaming SQLite (no second full copy of the vectors in memory)."""
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_ids = np.zeros((len(queries), 0), np.int64)
        for ids, vectors in self._scan():
            scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
            keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(all_ids, keep, 1)
        return best_ids

    def _scan(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) from SQLite in batches of READ_BATCH rows."""
        last = 0
        while True:
            rows = self._db.execute("SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?",
                                    (last, READ_BATCH)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.dim)
            last = int(ids[-1])
            yield ids, vectors

    def _sample(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros((0, self.dim), np.float32)
        rows = self._db.execute("SELECT vector FROM items ORDER BY RANDOM() LIMIT ?", (n,)).fetchall()
        return np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), self.dim).copy()

    def save(self) -> None:
        """Write faiss.index then faiss.json, each atomically (json last: it vouches for the index)."""
        with self._lock:
            if self._index is None or self._tombstones:
                return  # nothing current to save; a stale cache is rebuilt on the next open
            data = faiss.serialize_index(self._index).tobytes()
            atomic_write(self.folder / FAISS_FILE, lambda handle: handle.write(data))
            # The checksum lets the next open tell a damaged file (same size, other bytes) from a good one.
            meta = {**self._meta, "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_text(self.folder / FAISS_META, json.dumps(meta, indent=2))

    def close(self) -> None:
        """Save the FAISS cache and close SQLite."""
        with self._lock:
            self.save()
            self._db.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


