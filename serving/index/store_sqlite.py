"""The embedded index's source of truth: one SQLite file (WAL) of items, thumbnails, idempotency keys and info.

An item's ``source`` says where its image can be read again (``sha256:<hex>`` in the collection's originals store,
``file:<path>``, or NULL for an item added as a vector): a column added to older files when they are opened.

Every statement the embedded backend runs is here, so the schema and the queries change together. One
connection is shared by the store's threads under one re-entrant lock; writes run inside ``write()``
(``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error), reads take the lock for their statement.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from corinfomax.core.errors import BadInput

DB_FILE = "index.sqlite"
READ_BATCH = 50_000
KEY_TTL_S = 24 * 3600  # a retried write is recognised for a day
FIELD_INDEX = "field:"  # the name of an expression index on a metadata field: this, then the field's name

# One stored row as written: vector bytes (float32), metadata as JSON text, label.
Row = tuple[bytes, str, str | None]

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
# Added to files made before items had a source; indexed, so "is this original still used?" is one lookup.
_SOURCE_COLUMN = "ALTER TABLE items ADD COLUMN source TEXT NULL"
_SOURCE_INDEX = "CREATE INDEX IF NOT EXISTS items_source ON items(source) WHERE source IS NOT NULL"


class Database:
    """The SQLite file of one index folder (``folder/index.sqlite``), opened for the store's threads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.RLock()
        self._db = sqlite3.connect(folder / DB_FILE, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged add survives power loss, not only a crash
        # The page cache is the store's only memory besides its vectors (FAISS): it grew to 1.6 MiB under
        # 6,000 rounds of keyed add/delete/search/get. SQLite's default bound, 2 MiB, stated here.
        self._db.execute("PRAGMA cache_size=-2048")

    def create(self, dim: int | None, model_sha256: str | None) -> dict[str, str]:
        """Create the tables if missing and record ``dim`` and ``model_sha256`` in a new index; return the info."""
        with self.write():
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if "source" not in {row[1] for row in self._db.execute("PRAGMA table_info(items)")}:
                self._db.execute(_SOURCE_COLUMN)
            self._db.execute(_SOURCE_INDEX)
            info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
            if "embedding_dim" not in info:
                if dim is None:
                    raise BadInput(f"index {self.folder} has no embedding_dim; give dim to initialise it")
                info = {"embedding_dim": str(int(dim)), "model_sha256": model_sha256 or "", "generation": "0"}
                self._db.executemany("INSERT INTO info(key, value) VALUES (?, ?)", list(info.items()))
        return info

    def write(self) -> "Transaction":
        return Transaction(self._db, self.lock)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """First column of the first row, under the lock (one connection is shared by threads)."""
        with self.lock:
            return self._db.execute(sql, params).fetchone()[0]

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.lock:
            return self._db.execute(sql, params).fetchall()

    # -- info -------------------------------------------------------------------------------------

    def generation(self) -> int:
        return int(self.one("SELECT value FROM info WHERE key='generation'"))

    def bump(self) -> int:
        """Count a write (inside its transaction): readers in other processes see the new generation."""
        self._db.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return self.generation()

    def count(self) -> int:
        return int(self.one("SELECT COUNT(*) FROM items"))

    def labelled_count(self) -> int:
        return int(self.one("SELECT COUNT(*) FROM items WHERE label IS NOT NULL"))

    def thumbnail_count(self) -> int:
        return int(self.one("SELECT COUNT(*) FROM thumbnails"))

    # -- writes (inside ``write()``) ----------------------------------------------------------------

    def insert(self, rows: list[Row], sources: Sequence[str | None] | None = None) -> list[int]:
        """Insert with explicit consecutive ids (AUTOINCREMENT never reuses a deleted id)."""
        start = self.next_id()
        ids = list(range(start, start + len(rows)))
        self.insert_at(ids, rows, sources)
        return ids

    def insert_at(self, ids: Sequence[int], rows: list[Row], sources: Sequence[str | None] | None = None) -> None:
        """Insert with the given ids (another generation's): the sequence follows them, so none is handed out again."""
        now = time.time()
        sources = list(sources) if sources is not None else [None] * len(rows)
        self._db.executemany(
            "INSERT INTO items(id, vector, metadata, label, created_at, source) VALUES (?, ?, ?, ?, ?, ?)",
            [(i, v, m, lab, now, src) for i, (v, m, lab), src in zip(ids, rows, sources)],
        )

    def next_id(self) -> int:
        """The id the next insert gets: above every id this file ever handed out."""
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='items'").fetchone()
        return (seq[0] if seq else 0) + 1

    def reserve(self, floor: int) -> None:
        """Make the next id at least ``floor`` (inside ``write()``): ids another generation handed out stay used."""
        if self.next_id() >= floor:
            return
        if self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name='items'", (floor - 1,)).rowcount == 0:
            self._db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('items', ?)", (floor - 1,))

    def insert_thumbnails(self, ids: Iterable[int], thumbnails: Iterable[bytes | None]) -> None:
        self._db.executemany("INSERT INTO thumbnails(id, image) VALUES (?, ?)",
                             [(i, t) for i, t in zip(ids, thumbnails) if t is not None])

    def delete(self, ids: list[int]) -> None:
        self._db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
        self._db.executemany("DELETE FROM thumbnails WHERE id = ?", [(i,) for i in ids])

    def done(self, key: str | None) -> list[int] | None:
        """The result of the committed write with idempotency ``key``, if any."""
        if key is None:
            return None
        row = self._db.execute("SELECT result FROM writes WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def remember(self, key: str | None, result: list[int]) -> None:
        """Record a write's result under its key (same transaction as the write); forget expired keys."""
        if key is None:
            return
        now = time.time()
        self._db.execute("DELETE FROM writes WHERE created_at < ?", (now - KEY_TTL_S,))
        self._db.execute("INSERT INTO writes(key, result, created_at) VALUES (?, ?, ?)",
                         (key, json.dumps(result), now))

    def keys(self) -> list[tuple[str, str, float]]:
        """Every remembered idempotency key (key, result JSON, created_at)."""
        return self.rows("SELECT key, result, created_at FROM writes")

    def put_keys(self, keys: list[tuple[str, str, float]]) -> None:
        """Remember another generation's keys (inside ``write()``), keeping any this file has already."""
        self._db.executemany("INSERT OR IGNORE INTO writes(key, result, created_at) VALUES (?, ?, ?)", keys)

    # -- reads --------------------------------------------------------------------------------------

    def existing(self, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.rows(f"SELECT id FROM items WHERE id IN ({marks})", chunk))
        return found

    def item(self, item_id: int) -> tuple[int, bytes, str, str | None] | None:
        """(id, vector bytes, metadata text, label) of one item, or None."""
        with self.lock:
            return self._db.execute("SELECT id, vector, metadata, label FROM items WHERE id = ?",
                                    (item_id,)).fetchone()

    def thumbnail(self, item_id: int) -> bytes | None:
        with self.lock:
            row = self._db.execute("SELECT image FROM thumbnails WHERE id = ?", (item_id,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def texts(self, ids: set[int]) -> dict[int, tuple[str, str | None]]:
        """Metadata (JSON text) and label of each id."""
        out: dict[int, tuple[str, str | None]] = {}
        for chunk in _chunks(sorted(ids), 900):
            marks = ",".join("?" * len(chunk))
            for i, meta, label in self.rows(f"SELECT id, metadata, label FROM items WHERE id IN ({marks})", chunk):
                out[i] = (meta, label)
        return out

    def items_after(self, last: int, batch: int) -> list[tuple[int, bytes, str, str | None, bytes | None]]:
        """Up to ``batch`` items with ids above ``last``, in id order, each with its thumbnail (or None)."""
        return self.rows("SELECT items.id, vector, metadata, label, image FROM items LEFT JOIN thumbnails USING (id) "
                         "WHERE items.id > ? ORDER BY items.id LIMIT ?", (last, batch))

    def stored(self, ids: list[int]) -> list[tuple[int, str, str | None, bytes | None, str | None]]:
        """(id, metadata text, label, thumbnail, source) of those of ``ids`` that exist."""
        out = []
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            out += self.rows(f"SELECT items.id, metadata, label, image, source FROM items LEFT JOIN thumbnails "
                             f"USING (id) WHERE items.id IN ({marks})", chunk)
        return out

    def id_list(self) -> np.ndarray:
        """Every id, ascending."""
        return np.asarray([r[0] for r in self.rows("SELECT id FROM items ORDER BY id")], np.int64)

    def sources(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT DISTINCT source FROM items WHERE source IS NOT NULL")}

    def references(self, source: str) -> bool:
        return bool(self.rows("SELECT 1 FROM items WHERE source = ? LIMIT 1", (source,)))

    def labelled(self) -> list[tuple[int, bytes, str]]:
        """(id, vector bytes, label) of every labelled item, in id order."""
        return self.rows("SELECT id, vector, label FROM items WHERE label IS NOT NULL ORDER BY id")

    def scan(self, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) in id order, READ_BATCH rows at a time."""
        last = 0
        while True:
            rows = self.rows("SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, READ_BATCH))
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
            last = int(ids[-1])
            yield ids, vectors

    def matching(self, dim: int, where: str, params: Sequence[Any], batch: int) -> Iterator[tuple[np.ndarray,
                                                                                              np.ndarray]]:
        """(ids, vectors) of the rows where ``where`` holds, ``batch`` rows at a time, in no set order: without an
        ORDER BY, SQLite may find them through an index on a field the condition reads (ranges included), where
        paging by id would walk the whole table. Holds the lock until the last batch is read."""
        with self.lock:
            cursor = self._db.execute(f"SELECT id, vector FROM items WHERE {where}", params)
            while rows := cursor.fetchmany(batch):
                yield (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                       np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim))

    def matching_ids(self, where: str, params: Sequence[Any], batch: int) -> Iterator[np.ndarray]:
        """The ids of the rows where ``where`` holds, ``batch`` at a time, in no set order (as ``matching``)."""
        with self.lock:
            cursor = self._db.execute(f"SELECT id FROM items WHERE {where}", params)
            while rows := cursor.fetchmany(batch):
                yield np.fromiter((r[0] for r in rows), np.int64, len(rows))

    def passing(self, ids: set[int], where: str, params: Sequence[Any]) -> set[int]:
        """Those of ``ids`` whose rows satisfy ``where``."""
        found: set[int] = set()
        for chunk in _chunks(sorted(ids), 900):
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.rows(f"SELECT id FROM items WHERE id IN ({marks}) AND ({where})",
                                                 (*chunk, *params)))
        return found

    def page(self, after: int, limit: int, where: str = "1",
             params: Sequence[Any] = ()) -> list[tuple[int, str, str | None]]:
        """(id, metadata text, label) of up to ``limit`` rows with ids above ``after`` where ``where`` holds, by id."""
        return self.rows(f"SELECT id, metadata, label FROM items WHERE id > ? AND ({where}) ORDER BY id LIMIT ?",
                         (after, *params, limit))

    def sample_rows(self, n: int) -> list[tuple[int, str | None, str]]:
        """(id, label, metadata text) of ``n`` random rows (fewer if there are fewer)."""
        return self.rows("SELECT id, label, metadata FROM items ORDER BY RANDOM() LIMIT ?", (n,))

    def update(self, item_id: int, metadata: str | None, label: str | None, set_label: bool) -> bool:
        """Set an item's metadata (JSON text; None keeps it) and, if ``set_label``, its label (inside ``write()``);
        whether the item exists."""
        cursor = self._db.execute("UPDATE items SET metadata = coalesce(?, metadata), "
                                  "label = CASE WHEN ? THEN ? ELSE label END WHERE id = ?",
                                  (metadata, set_label, label, item_id))
        return cursor.rowcount > 0

    def index_field(self, name: str, expression: str) -> None:
        """An expression index on ``expression`` (how the compiled filters read metadata field ``name``; both
        validated), named after the field so ``indexed_fields`` can list it (inside ``write()``). One made on
        another expression (an earlier version's reading of the field, which no filter uses now) is replaced."""
        if not self.field_index_reads(name, expression):
            self._db.execute(f'DROP INDEX IF EXISTS "{FIELD_INDEX}{name}"')
        self._db.execute(f'CREATE INDEX IF NOT EXISTS "{FIELD_INDEX}{name}" ON items({expression})')

    def field_index_reads(self, name: str, expression: str) -> bool:
        """Whether the index on metadata field ``name`` exists and is made on ``expression``."""
        rows = self.rows("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (FIELD_INDEX + name,))
        return bool(rows) and expression in rows[0][0]

    def indexed_fields(self) -> list[str]:
        rows = self.rows("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE ? ORDER BY name",
                         (FIELD_INDEX + "%",))
        return [r[0][len(FIELD_INDEX):] for r in rows]

    def sample(self, dim: int, n: int) -> np.ndarray:
        """``n`` random stored vectors (fewer if there are fewer)."""
        if n <= 0:
            return np.zeros((0, dim), np.float32)
        rows = self.rows("SELECT vector FROM items ORDER BY RANDOM() LIMIT ?", (n,))
        return np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), dim).copy()

    def close(self) -> None:
        with self.lock:
            self._db.close()


class Transaction:
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
