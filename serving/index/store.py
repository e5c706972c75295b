"""The embedded index (docs/FORMATS.md section 5): SQLite (WAL) is the source of truth, FAISS a cache.

Why this split: an add is acknowledged only once SQLite has committed it, so a crash never loses an
acknowledged item; the FAISS file may lag behind and is rebuilt from SQLite whenever it is missing,
unreadable or of another ``generation``. Every write bumps ``generation``; a reader that sees a
generation it did not write itself (another process wrote) reloads its FAISS copy from SQLite.

``IndexStore`` is the backend's public face (the ``VectorIndex`` protocol); its parts each have a module:
``store_sqlite`` (the schema, transactions and every query), ``store_faiss`` (the cache: load, refill,
rebuild, save) and ``store_search`` (the FAISS query and the answer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index import store_filter, store_search
from corinfomax.serving.index.backend import (
    Hit,
    IndexMismatch,
    Item,
    Labelled,
    StoredRow,
    check_ids,
    check_k,
    check_key,
    check_label,
    check_metadata,
    check_new_ids,
    check_rows,
    check_sources,
    check_thumbnails,
    normalise,
)
from corinfomax.serving.index.filter_compile import sql_field
from corinfomax.serving.index.filters import Field, Filter, metadata_field
from corinfomax.serving.index.store_faiss import FaissCache
from corinfomax.serving.index.store_sqlite import DB_FILE, Database, Row


class IndexStore:
    """Open (or create) an index folder; add, delete, get and search unit vectors with metadata.

    Thread-safe within a process (one lock). Several processes may open the same folder: SQLite
    serialises their writes and each process notices the others' writes through ``generation``.
    For serving, one process owns the store and the others call it (``serving.api.index_owner``).

    Args:
        folder: the index folder (created if missing; then ``dim`` is required).
        dim: expected embedding dimension; a folder of another dimension is refused.
        model_sha256: the bundle's ``checkpoint_sha256``; a folder built by another model is refused.
    """

    def __init__(self, folder: str | Path, dim: int | None = None, model_sha256: str | None = None) -> None:
        self.folder = Path(folder)
        if not (self.folder / DB_FILE).exists():
            if dim is None:
                raise BadInput(f"{self.folder} is not an index (no {DB_FILE}); give the embedding dim to create one")
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():
            raise BadInput(f"index path {self.folder} is not a folder")
        self._db = Database(self.folder)
        self._lock = self._db.lock
        self._check_info(self._db.create(dim, model_sha256), dim, model_sha256)
        self._cache = FaissCache(self.folder, self._db, self.dim)
        self._labelled: tuple[int, Labelled] | None = None
        self._selectivity = store_filter.Selectivity()
        self._cache.load()
        for name in self._db.indexed_fields():  # made by an earlier version: remade as today's filters read it
            if not self._db.field_index_reads(name, sql_field(metadata_field(name))):
                self.index_field(metadata_field(name))

    def _check_info(self, info: dict[str, str], dim: int | None, model_sha256: str | None) -> None:
        self.dim = int(info["embedding_dim"])
        self.model_sha256 = info.get("model_sha256") or None
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatch(f"index {self.folder} holds {self.dim}-dim vectors, the model makes {dim}-dim ones; "
                                f"use another index folder or rebuild it with this model")
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise IndexMismatch(f"index {self.folder} was built with model {self.model_sha256[:12]}, not "
                                f"{model_sha256[:12]}; its vectors are not comparable: use another index folder")

    def generation(self) -> int:
        return self._db.generation()

    def count(self) -> int:
        return self._db.count()

    # -- writes -------------------------------------------------------------------------------

    def add(
        self,
        vectors: Any,
        metadata: Sequence[dict[str, Any]] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        key: str | None = None,
        sources: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Store vectors (L2-normalised here) with metadata, labels, thumbnails (encoded images, e.g.
        ``core.thumbnails.make_thumbnail``) and sources; return their new ids once committed, all in one commit.

        With an idempotency ``key`` already used by a committed write, nothing is stored and that write's
        ids come back, so a client (or the service's internal hop) can retry a write it lost the answer to.
        """
        return self._add(None, vectors, metadata, labels, thumbnails, key, sources)

    def add_at(self, ids: Sequence[int], vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
               labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
               key: str | None = None, sources: Sequence[str | None] | None = None) -> list[int]:
        """``add`` with the ids given (another generation's); the sequence follows them."""
        return self._add(ids, vectors, metadata, labels, thumbnails, key, sources)

    def _add(self, ids: Sequence[int] | None, vectors: Any, metadata: Sequence[dict[str, Any]] | None,
             labels: Sequence[str | None] | None, thumbnails: Sequence[bytes | None] | None, key: str | None,
             sources: Sequence[str | None] | None) -> list[int]:
        vectors = normalise(vectors, self.dim)
        rows = _rows(vectors, metadata, labels)
        thumbs = check_thumbnails(thumbnails, len(rows))
        origins = check_sources(sources, len(rows))
        given = check_new_ids(ids, len(rows)) if ids is not None else None
        key = check_key(key)
        with self._lock:
            with self._db.write():
                done = self._db.done(key)
                if done is not None:
                    return list(done)
                if given is None:
                    new = self._db.insert(rows, origins)
                else:
                    taken = self._db.existing(given)
                    if taken:
                        raise BadInput(f"ids {sorted(taken)[:10]} are taken in index {self.folder}")
                    new = given
                    self._db.insert_at(new, rows, origins)
                self._db.insert_thumbnails(new, thumbs)
                self._db.remember(key, new)
                generation = self._db.bump()
            self._cache.after_write(generation, new, vectors)
        return new

    def put_rows(self, rows: Sequence[StoredRow], vectors: np.ndarray) -> None:
        """Insert copies of another generation's rows (their ids, absent here) with new vectors."""
        if not rows:
            return
        self.add_at([row.id for row in rows], vectors, [row.metadata for row in rows], [row.label for row in rows],
                    [row.thumbnail for row in rows], sources=[row.source for row in rows])

    def add_many(self, batches: Iterable[tuple[Any, ...]], rebuild: bool = True) -> int:
        """Bulk path for `corinfomax index build`: one SQLite commit per batch, then one FAISS rebuild.

        Each batch is ``(vectors [n, D], metadata or None, labels or None[, sources or None[, thumbnails or
        None]])``. Returns the rows added.
        """
        total = 0
        with self._lock:
            for batch in batches:
                vectors, metadata, labels = batch[:3]
                sources, thumbnails = (*batch[3:5], None, None)[:2]  # optional: absent or None
                rows = _rows(normalise(vectors, self.dim), metadata, labels)
                thumbs = check_thumbnails(thumbnails, len(rows))
                with self._db.write():
                    self._db.insert_thumbnails(self._db.insert(rows, check_sources(sources, len(rows))), thumbs)
                    self._db.bump()
                total += len(rows)
            self._cache.forget()
            if rebuild:
                self.rebuild()
        return total

    def delete(self, ids: Sequence[int], key: str | None = None) -> list[int]:
        """Delete items by id; all must exist (else NotFound and nothing is deleted). ``key``: as in ``add``."""
        wanted = check_ids(ids)
        key = check_key(key)
        with self._lock:
            with self._db.write():
                done = self._db.done(key)
                if done is not None:
                    return list(done)
                present = self._db.existing(wanted)
                missing = [i for i in wanted if i not in present]
                if missing:
                    raise NotFound(f"no item with id {', '.join(map(str, missing[:10]))}")
                self._db.delete(wanted)
                self._db.remember(key, wanted)
                generation = self._db.bump()
            self._cache.after_write(generation, wanted)
        return wanted

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Delete those of ``ids`` that exist here (a delete the collection's live generation took); return them."""
        wanted = check_ids(ids)
        with self._lock:
            with self._db.write():
                present = [i for i in wanted if i in self._db.existing(wanted)]
                if not present:
                    return []
                self._db.delete(present)
                generation = self._db.bump()
            self._cache.after_write(generation, present)
        return present

    def update(self, item_id: int, metadata: dict[str, Any] | None = None, label: str | None = None,
               set_label: bool = False) -> bool:
        """Replace an item's metadata (unless None) and, with ``set_label``, its label (None: unlabelled), keeping
        its vector; whether it exists here. The kNN vote's cache of labelled items goes with the generation."""
        (item_id,) = check_ids([item_id])
        text = check_metadata(metadata, "metadata") if metadata is not None else None
        check_label(label, "label")
        with self._lock:
            with self._db.write():
                if not self._db.update(item_id, text, label, set_label):
                    return False
                generation = self._db.bump()
            self._cache.after_write(generation)  # the vectors did not change
        return True

    def index_field(self, field: Field) -> None:
        """An SQLite expression index on a metadata field, read exactly as the compiled filters read it."""
        with self._lock, self._db.write():
            self._db.index_field(field.name, sql_field(field))

    def next_id(self) -> int:
        """The id the next add gets (above every id this generation handed out or was given)."""
        with self._lock:
            return self._db.next_id()

    def reserve_ids(self, floor: int) -> None:
        """Make every id this generation hands out from now on at least ``floor``."""
        with self._lock, self._db.write():
            self._db.reserve(floor)

    def take_keys(self, other: "IndexStore") -> None:
        """Remember ``other``'s idempotency keys too: a write retried after a switch is still answered once."""
        keys = other._db.keys()
        with self._lock, self._db.write():
            self._db.put_keys(keys)

    # -- reads --------------------------------------------------------------------------------

    def get(self, item_id: int) -> Item:
        (item_id,) = check_ids([item_id])
        row = self._db.item(item_id)
        if row is None:
            raise NotFound(f"no item with id {item_id}")
        return Item(row[0], np.frombuffer(row[1], np.float32).copy(), json.loads(row[2]), row[3])

    def thumbnail(self, item_id: int) -> bytes:
        """The stored thumbnail of an item (NotFound if the item is unknown or was added without one)."""
        (item_id,) = check_ids([item_id])
        image = self._db.thumbnail(item_id)
        if image is None:
            self.get(item_id)  # NotFound for an unknown id
            raise NotFound(f"item {item_id} has no thumbnail (it was added as a vector, or with thumbnails off)")
        return image

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored unit vectors of ``ids`` (NotFound if any is unknown), float32 ``[N, D]``."""
        return np.stack([self.get(i).vector for i in check_ids(ids)])

    def search(self, queries: Any, k: int, labelled_only: bool = False, where: Filter | None = None) -> list[list[Hit]]:
        """Top-``k`` stored items by inner product of unit vectors, per query (fewer if the index is smaller), among
        those ``where`` passes (``store_filter``)."""
        queries = normalise(queries, self.dim, "query vectors")
        k = check_k(k)
        with self._lock:
            if where is None:
                allowed = self.labelled().ids if labelled_only else None
                ranked, texts = store_search.nearest(self._cache, self._db, queries, k, allowed)
            else:
                ranked = store_filter.nearest_where(self._cache, self._db, self._selectivity, queries, k, where,
                                                    labelled_only)
                texts = self._db.texts({i for row in ranked for i, _ in row})
        return store_search.hits(ranked, texts)

    def page(self, after: int, limit: int, where: Filter | None = None) -> list[tuple[int, dict[str, Any], str | None]]:
        """Up to ``limit`` items (id, metadata, label) with ids above ``after`` that ``where`` passes, by id."""
        condition, params = store_filter.condition(where, False)
        return [(i, json.loads(meta), label) for i, meta, label in self._db.page(after, limit, condition, params)]

    def items(self, batch: int) -> Iterator[list[tuple[Item, bytes | None]]]:
        """Every item with its thumbnail (or None), in id order, ``batch`` at a time (for `index migrate`)."""
        last = 0
        while rows := self._db.items_after(last, batch):
            last = rows[-1][0]
            yield [(Item(i, np.frombuffer(v, np.float32).copy(), json.loads(m), label),
                    bytes(image) if image is not None else None) for i, v, m, label, image in rows]

    def scan(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every item's (ids, unit vectors) in id order, a SQLite read at a time (for `index duplicates`)."""
        return self._db.scan(self.dim)

    def stored(self, ids: Sequence[int]) -> list[StoredRow]:
        """The rows of those of ``ids`` that exist, in id order (for copying them into another generation)."""
        rows = self._db.stored(sorted(set(check_ids(ids)))) if len(ids) else []
        return sorted((StoredRow(i, json.loads(meta), label, bytes(image) if image is not None else None, source, {})
                       for i, meta, label, image, source in rows), key=lambda row: row.id)

    def id_list(self) -> np.ndarray:
        return self._db.id_list()

    def existing(self, ids: Sequence[int]) -> set[int]:
        return self._db.existing(list(ids)) if len(ids) else set()

    def sources(self) -> set[str]:
        return self._db.sources()

    def references(self, source: str) -> bool:
        return self._db.references(source)

    def labelled(self) -> Labelled:
        """All labelled items (for kNN classification), cached until the next write."""
        with self._lock:
            generation = self.generation()
            if self._labelled is not None and self._labelled[0] == generation:
                return self._labelled[1]
            rows = self._db.labelled()
            result = Labelled(
                np.asarray([i for i, _, _ in rows], np.int64),
                np.stack([np.frombuffer(blob, np.float32) for _, blob, _ in rows]) if rows
                else np.zeros((0, self.dim), np.float32),
                [label for _, _, label in rows],
            )
            self._labelled = (generation, result)
            return result

    def stats(self) -> dict[str, Any]:
        """Size and state of the index, for `info`, `/metrics` and the CLI."""
        with self._lock:
            index = self._cache.current()
            meta = self._cache.meta
            return {
                "count": self.count(),
                "labelled": self._db.labelled_count(),
                "thumbnails": self._db.thumbnail_count(),
                "dim": self.dim,
                "model_sha256": self.model_sha256,
                "generation": self.generation(),
                "kind": meta.get("kind"),
                "recall_at_10": meta.get("recall_at_10"),
                "nprobe": meta.get("nprobe"),
                "ef_search": meta.get("ef_search"),
                "faiss_ntotal": int(index.ntotal),
                "pending_deletes": len(self._cache.tombstones),
                "indexed_fields": self._db.indexed_fields(),
            }

    # -- the FAISS cache, files -------------------------------------------------------------------

    def rebuild(self, kind: str | None = None, memory_budget_bytes: int | None = None) -> dict[str, Any]:
        """Build a FAISS index from SQLite, measure recall@10, save atomically.

        With ``kind`` None the kinds of `kinds.candidates` are tried in turn until one reaches the recall
        target, so the recall the index reports is one it reaches; an explicit ``kind`` is kept as asked.
        Returns what ``faiss.json`` records: ``generation``, ``count``, ``kind``, ``recall_at_10``,
        and the tuned ``nprobe`` (IVF) or ``ef_search`` (HNSW).
        """
        return self._cache.rebuild(kind, memory_budget_bytes)

    def building(self) -> bool:
        """Whether a background FAISS build runs (started when the exact index outgrew ``kinds.FLAT_MAX``)."""
        return self._cache.building()

    def wait_for_build(self, timeout: float | None = None) -> None:
        """Wait until no background FAISS build runs."""
        self._cache.wait_for_build(timeout)

    def save(self) -> None:
        """Write the FAISS cache's files (faiss.index, then faiss.json), each atomically."""
        self._cache.save()

    def close(self) -> None:
        """Save the FAISS cache and close SQLite."""
        with self._lock:
            self._cache.abandon_build()
            self._cache.save()
            self._db.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(vectors: np.ndarray, metadata: Sequence[dict] | None, labels: Sequence[str | None] | None) -> list[Row]:
    return [(vector.tobytes(), text, label) for vector, text, label in check_rows(vectors, metadata, labels)]
