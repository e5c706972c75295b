"""The embedded index's FAISS cache: a copy of the SQLite vectors for fast search, never the source of truth.

It is loaded from ``faiss.index`` when that file's checksum and generation match ``faiss.json`` and SQLite,
refilled from SQLite when another process wrote since (the index structure and its IVF training are kept),
rebuilt when it is missing or unreadable (trying the kinds of ``kinds.candidates`` until one reaches the
recall target), and saved atomically. The store applies its own writes to it directly.

An index that starts empty (a new collection, a re-embedded generation) is exact (``Flat``) and grows by those
writes. Once it outgrows ``kinds.FLAT_MAX`` it is rebuilt in the background as the kind its size calls for, as
Qdrant builds a segment's HNSW past its indexing threshold: the build works on a copy of the vectors without
holding the store's lock, the writes made meanwhile are replayed onto it (all but the last few outside the lock),
and it replaces the exact index under the lock. Requests keep being answered, exactly, until then. An HNSW
graph, which cannot remove items, is rebuilt the same way once its deleted items are a fifth of it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import faiss
import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.files import atomic_write, atomic_write_text
from corinfomax.serving.index import kinds
from corinfomax.serving.index.priority import lower_priority
from corinfomax.serving.index.store_sqlite import Database

log = logging.getLogger(__name__)

FAISS_FILE = "faiss.index"
FAISS_META = "faiss.json"
COPY_BATCH = 65_536  # vectors added to a new index at a time from an in-memory copy
# A background build catches up with the writes made meanwhile outside the lock, in rounds, until one round has
# at most this many left to replay under the lock (or the last round, if writes come faster than they replay).
REPLAY_UNDER_LOCK = 64
REPLAY_ROUNDS = 8
# An HNSW graph keeps deleted items (skipped by searches: recall@10 held 0.97 with 80% deleted on 100k clustered
# items, in a one-off loop of deletes and searches); it is rebuilt without them once they are this share of it,
# so that churn does not grow it for ever.
VACUUM_SHARE = 0.2
VACUUM_MIN = 1_000

Write = tuple[np.ndarray, "np.ndarray | None"]  # (ids, their vectors: added) or (ids, None: removed)


def apply(index: faiss.Index, write: Write, hidden: set[int]) -> None:
    """Apply one write to ``index``; ids a kind cannot remove (HNSW) go into ``hidden`` (hidden from searches
    until the next rebuild)."""
    ids, vectors = write
    if vectors is not None:
        index.add_with_ids(vectors, ids)
    elif len(ids):
        try:
            index.remove_ids(ids)
        except RuntimeError:
            hidden.update(ids.tolist())


class Vectors(Protocol):
    """Where a build reads the vectors it indexes: SQLite (``Database``) or a copy in memory (``Copied``)."""

    def sample(self, dim: int, n: int) -> np.ndarray: ...

    def scan(self, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class Copied:
    """The vectors of an index that keeps them in an id map (Flat, HNSW), copied out of it but for the deleted
    (``hidden``) ones: what a background build reads instead of SQLite."""

    def __init__(self, index: faiss.Index, hidden: set[int]) -> None:
        ids = faiss.vector_to_array(index.id_map)
        keep = ~np.isin(ids, np.fromiter(hidden, np.int64, len(hidden)))  # deleted ones stay behind
        self.ids = ids[keep]
        self.vectors = kinds.base_of(index).reconstruct_n(0, index.ntotal)[keep]

    def sample(self, dim: int, n: int) -> np.ndarray:
        picked = np.random.default_rng(0).choice(len(self.ids), min(n, len(self.ids)), replace=False)
        return self.vectors[np.sort(picked)]

    def scan(self, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.ids), COPY_BATCH):
            yield self.ids[start : start + COPY_BATCH], self.vectors[start : start + COPY_BATCH]


class FaissCache:
    """The in-memory FAISS index of one index folder, with what ``faiss.json`` records about it (``meta``) and
    the ids deleted from an index kind that cannot remove them (``tombstones``, HNSW: hidden until a rebuild)."""

    def __init__(self, folder: Path, db: Database, dim: int) -> None:
        self.folder, self.db, self.dim = folder, db, dim
        self.index: faiss.Index | None = None
        self.meta: dict[str, Any] = {}
        self.tombstones: set[int] = set()
        # The writes made while a background build runs, to replay onto its index; None when none runs or when
        # the running one can no longer be brought up to date (another process wrote, the cache was reloaded).
        self._replay: list[Write] | None = None
        self._builder: threading.Thread | None = None
        self._hidden: tuple[set[int], int, faiss.IDSelector] | None = None  # ``hidden``: for which set, at which size

    def current(self) -> faiss.Index:
        """The in-memory FAISS copy, reloaded from SQLite if another process wrote since."""
        if self.index is None or self.meta.get("generation") != self.db.generation():
            self.refill()
        assert self.index is not None
        return self.index

    def after_write(self, generation: int, ids: Sequence[int] = (), vectors: np.ndarray | None = None) -> None:
        """Apply our own write to the in-memory copy if it was current just before it: ``vectors`` added with
        ``ids``, or without vectors those ``ids`` removed (none: only metadata changed). A background build
        replays it too; a write that takes the exact index past ``kinds.FLAT_MAX`` starts that build."""
        if self.index is None or self.meta.get("generation") != generation - 1:
            self.index, self._replay = None, None  # someone else wrote in between: reload lazily
            return
        write: Write = (np.asarray(ids, np.int64), vectors)
        apply(self.index, write, self.tombstones)
        self.meta.update(generation=generation, count=int(self.index.ntotal))
        if self._replay is not None:
            self._replay.append(write)
        elif self.needs_build():
            self._build_in_background()

    def needs_build(self) -> bool:
        """Whether a background build is due: the exact index outgrown, or an HNSW graph grown by deletes."""
        return self.outgrown() or self.overgrown_by_deletes()

    def outgrown(self) -> bool:
        """Whether the index is exact past ``kinds.FLAT_MAX`` and has at least doubled since it was last built
        (so an index a build made exact on purpose, no other kind reaching the recall target, is tried again
        only at twice its size), with no build running; never when its kind was asked for (``rebuild(kind)``)."""
        assert self.index is not None
        grown = self.index.ntotal > max(kinds.FLAT_MAX, 2 * int(self.meta.get("built_count", 0)))
        exact = self.meta.get("kind") == "Flat" and not self.meta.get("kind_asked")
        return exact and grown and not self.building()

    def overgrown_by_deletes(self) -> bool:
        """Whether deleted items an HNSW graph keeps are ``VACUUM_SHARE`` of it (and ``VACUUM_MIN``), with no
        build running."""
        assert self.index is not None
        deleted = len(self.tombstones)
        return deleted >= max(VACUUM_MIN, VACUUM_SHARE * self.index.ntotal) and not self.building()

    def building(self) -> bool:
        return self._builder is not None and self._builder.is_alive()

    def wait_for_build(self, timeout: float | None = None) -> None:
        """Wait until no background build runs (for tests and benches)."""
        if self._builder is not None:
            self._builder.join(timeout)

    def abandon_build(self) -> None:
        """Let a running background build finish unused (the store is closing; the next open starts it again)."""
        self._replay = None

    def _build_in_background(self) -> None:
        """Copy the index's vectors but the deleted ones (a memory copy, under the lock the caller holds) and
        build from the copy, in a thread of its own, the kind their number calls for (or the kind asked for)."""
        copied, replay = Copied(self.index, self.tombstones), list[Write]()
        self._replay = replay
        self._builder = threading.Thread(target=self._build_and_swap, args=(copied, replay), daemon=True,
                                         name=f"faiss-build-{self.folder.name}")
        self._builder.start()

    def _build_and_swap(self, copied: Copied, replay: list[Write]) -> None:
        """Build, catch up with the writes made meanwhile in rounds outside the lock (each replays what came
        during the one before), then take the lock for the last few and swap. The swap does not save: an HNSW
        file of 100k items takes about a second to write, and the store saves its cache when it closes."""
        lower_priority()
        started, count, asked = time.perf_counter(), len(copied.ids), bool(self.meta.get("kind_asked"))
        tries = [str(self.meta["kind"])] if asked else kinds.candidates(count, self.dim)
        log.info("index %s: rebuilding over %d vectors in the background (%s; %d deleted left out)", self.folder,
                 count, self.meta.get("kind"), len(self.tombstones))
        try:
            kind, index, figures = self._build_best(tries, count, copied)
        except Exception:  # the index keeps answering as it is; an exact one is tried again once it has doubled
            log.exception("index %s: the background build failed", self.folder)
            with self.db.lock:
                if self._replay is replay:
                    self._replay = None
                    self.meta["built_count"] = count
            return
        hidden: set[int] = set()  # ids the new index cannot remove (HNSW): its tombstones once swapped in
        for round_ in itertools.count():
            with self.db.lock:
                if self._replay is not replay:
                    log.info("index %s: background build dropped (the index was reloaded meanwhile)", self.folder)
                    return
                writes = replay.copy()
                replay.clear()
                if len(writes) <= REPLAY_UNDER_LOCK or round_ == REPLAY_ROUNDS:
                    for write in writes:
                        apply(index, write, hidden)
                    self._replay, self.index, self.tombstones = None, index, hidden  # the exact index had none
                    self.meta = {"generation": self.meta["generation"], "count": int(index.ntotal),
                                 "built_count": count, "kind": kind, "kind_asked": asked, **figures,
                                 "build_seconds": round(time.perf_counter() - started, 3)}
                    break
            for write in writes:
                apply(index, write, hidden)
        log.info("index %s: now %s over %d vectors (recall@10 %.3f), built in %.1fs beside the writes",
                 self.folder, kind, index.ntotal, figures["recall_at_10"], self.meta["build_seconds"])

    def hidden(self) -> faiss.IDSelector | None:
        """A FAISS selector of every id but the tombstones (None without any), made again only when they change:
        for 5,000 of them making it took about a third of a 100k-item HNSW search."""
        if not self.tombstones:
            return None
        # A set of tombstones only grows until it is replaced by another (never emptied in place), so the same
        # set at the same size holds the same ids.
        if self._hidden is None or self._hidden[0] is not self.tombstones or self._hidden[1] != len(self.tombstones):
            ids = np.fromiter(self.tombstones, np.int64, len(self.tombstones))
            self._hidden = (self.tombstones, len(ids), faiss.IDSelectorNot(faiss.IDSelectorBatch(ids)))
        return self._hidden[2]

    def holds_vectors(self) -> bool:
        """Whether ``vectors`` can read vectors back exactly (the kind keeps them uncompressed)."""
        return kinds.holds_vectors(self.meta.get("kind"))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` (all stored) from the FAISS copy. For a few thousand items this beats reading
        them from SQLite row by row: 2,000 of 200,000 took 0.3 ms here against 4.5 ms there."""
        return self.current().reconstruct_batch(ids)

    def forget(self) -> None:
        """Drop the in-memory copy (after bulk writes that a rebuild will cover)."""
        self.index, self.meta, self._replay = None, {}, None

    def load(self) -> None:
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
        if isinstance(index, faiss.IndexIDMap2) and faiss.try_extract_index_ivf(index.index) is not None:
            # Saved before IVF indexes held their own ids: after a delete its ids were shifted. Keep the
            # trained lists, refill them from SQLite.
            log.warning("index %s: FAISS cache in the old IVF layout; refilling it from SQLite", self.folder)
            index = faiss.clone_index(index.index)  # the map owns its index: a copy outlives it
            meta = {**meta, "generation": None}
        self.index, self.meta = kinds.readable(index, meta.get("kind")), meta  # saved before IVF kept an id table
        if meta.get("generation") != self.db.generation():
            log.info("index %s: FAISS cache is stale (generation %s, SQLite %s); refilling",
                     self.folder, meta.get("generation"), self.db.generation())
            self.refill()
        elif meta.get("tombstones"):  # deleted from a graph that cannot remove them: in the file, not in SQLite
            self.tombstones = set(np.setdiff1d(faiss.vector_to_array(index.id_map), self.db.id_list()).tolist())
        with self.db.lock:
            if self.needs_build():  # as written before the last close
                self._build_in_background()

    def refill(self) -> None:
        """Re-add every SQLite vector to the current index structure (keeps IVF training)."""
        with self.db.lock:
            if self.index is None or not self.meta.get("kind"):
                self.rebuild()
                return
            index, self._replay = self.index, None
            index.reset()
            generation = self.db.generation()
            for ids, vectors in self.db.scan(self.dim):
                index.add_with_ids(vectors, ids)
            self.meta.update(generation=generation, count=int(index.ntotal))
            self.tombstones = set()  # a new set: ``hidden`` tells sets apart by identity

    def rebuild(self, kind: str | None = None, memory_budget_bytes: int | None = None) -> dict[str, Any]:
        """Build a FAISS index from SQLite, measure recall@10, save atomically (``IndexStore.rebuild``)."""
        with self.db.lock:
            started = time.perf_counter()
            generation, count = self.db.generation(), self.db.count()
            self._replay = None  # a background build would be older than this one
            asked = kind is not None
            tries = [kind] if kind else kinds.candidates(count, self.dim, memory_budget_bytes)
            kind, index, figures = self._build_best(tries, count, self.db)
            meta: dict[str, Any] = {"generation": generation, "count": int(index.ntotal), "built_count": count,
                                    "kind": kind, "kind_asked": asked,
                                    **figures, "build_seconds": round(time.perf_counter() - started, 3)}
            self.index, self.meta = index, meta
            self.tombstones = set()  # a new set: ``hidden`` tells sets apart by identity
            self.save()
            log.info("index %s: built %s over %d vectors, recall@10 %.3f in %.1fs", self.folder, kind,
                     index.ntotal, meta["recall_at_10"], meta["build_seconds"])
            return dict(meta)

    def _build_best(self, tries: list[str], count: int, source: Vectors) -> tuple[str, faiss.Index, dict[str, Any]]:
        """The first kind of ``tries`` whose index reaches the recall target (else the last): (kind, index,
        figures)."""
        for kind in tries:
            index, figures = self._build(kind, count, source)
            if figures["recall_at_10"] >= kinds.RECALL_TARGET or kind == tries[-1]:
                break
            log.warning("index %s: %s reaches recall@10 %.3f < %.2f; trying the next kind",
                        self.folder, kind, figures["recall_at_10"], kinds.RECALL_TARGET)
        return kind, index, figures

    def _build(self, kind: str, count: int, source: Vectors) -> tuple[faiss.Index, dict[str, Any]]:
        """One FAISS index of ``kind``, trained on a sample of ``source`` and filled from it, with its tuned
        search."""
        try:
            base = faiss.index_factory(self.dim, kind, faiss.METRIC_INNER_PRODUCT)
            index = kinds.readable(kinds.with_ids(base), kind)
        except RuntimeError as err:
            raise BadInput(f"FAISS cannot make an index of kind {kind!r}: {err}") from err
        if not index.is_trained:
            lists = kinds.ivf_lists_of(kind)
            train = source.sample(self.dim, min(count, max(kinds.TRAIN_PER_LIST * lists, 10_000), kinds.TRAIN_MAX))
            if len(train) < lists:
                raise BadInput(f"kind {kind!r} needs at least {lists} vectors to train; the index has {count}")
            index.train(train)
        for ids, vectors in source.scan(self.dim):
            index.add_with_ids(vectors, ids)
        return index, self._tune(index, source)

    def _tune(self, index: faiss.Index, source: Vectors) -> dict[str, Any]:
        """Recall@10 against exact search (streamed from ``source``) on a sample, with nprobe/efSearch raised to
        the target."""
        queries = source.sample(self.dim, min(kinds.RECALL_SAMPLE, int(index.ntotal)))
        if len(queries) == 0:
            return {"recall_at_10": 1.0}
        return kinds.tune(index, queries, exact_top(queries, source.scan(self.dim), 10)[1])

    def save(self) -> None:
        """Write faiss.index then faiss.json, each atomically (json last: it vouches for the index)."""
        with self.db.lock:
            if self.index is None:
                return  # nothing current to save; a stale cache is refilled on the next open
            data = faiss.serialize_index(self.index).tobytes()
            atomic_write(self.folder / FAISS_FILE, lambda handle: handle.write(data))
            # The checksum lets the next open tell a damaged file (same size, other bytes) from a good one.
            meta = {**self.meta, "tombstones": len(self.tombstones), "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_text(self.folder / FAISS_META, json.dumps(meta, indent=2))


def exact_top(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]],
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each ``[Q, <=k]``, of the exact top-k by inner product over ``batches`` of (ids, vectors),
    keeping only k per query between batches."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for ids, vectors in batches:
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(all_ids, keep, 1)
    return best_scores, best_ids
