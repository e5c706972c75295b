"""Near-duplicates among unit vectors: every pair at or above a similarity threshold in a whole collection,
grouped (union-find over the pairs), and the folding of near-identical results of one search.

The whole-collection job reads the collection once, a batch at a time: each batch joins an exact FAISS index
(inner product, ``IndexFlatIP``), then is range-searched against it, which finds its pairs with every earlier
item and within itself, each pair once. Memory: the vectors (N x D float32, the index) plus the pairs of one
query batch; never an N x N matrix. A threshold so low that most items pair with most others makes O(N^2)
pairs whatever the method: raise it (``bench/duplicates_threshold.py`` measures where duplicates lie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import faiss
import numpy as np

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index.backend import MAX_K, Hit, VectorIndex, normalise

# Measured (bench/duplicates_threshold.py, docs/RESULTS.md): with the default model, every JPEG-q50 and
# half-size copy of 500 photos found at precision >= 0.996; lower finds more crops and flips, less precisely.
DEFAULT_THRESHOLD = 0.95
QUERY_BATCH = 256  # queries per range search: bounds the results held at once (<= 256 x N pairs)
# Results one dedup search may read (with their vectors) over all its queries: 4x what a plain search may answer
# (serving.api.limits.MAX_HITS), so a widening never costs more than a few plain searches.
MAX_FOLDED = 40_000
Batches = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 ids [n], unit vectors [n, D]) in scan order
T = TypeVar("T")


@dataclass(frozen=True)
class Pairs:
    """Pairs found in one range search: ``first[i]`` (scanned earlier) and ``second[i]`` at ``scores[i]``."""

    first: np.ndarray  # int64
    second: np.ndarray  # int64
    scores: np.ndarray  # float32, >= the threshold


@dataclass(frozen=True)
class Group:
    """Items that are near-duplicates of each other, directly or through other members."""

    ids: list[int]  # ascending
    scores: list[float]  # per member: its highest similarity to another member


@dataclass(frozen=True)
class Report:
    threshold: float
    items: int  # scanned
    pairs: int  # at or above the threshold
    groups: list[Group]  # ordered by their first id


def check_threshold(threshold: object, name: str = "threshold") -> float:
    """A similarity threshold for duplicates: a number in (0, 1] (``name``: the request field, for the 400)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise BadInput(f"{name} must be a number in (0, 1], got {str(threshold)[:40]}")
    return float(threshold)


def duplicate_pairs(batches: Batches, threshold: float, progress: Callable[[int], object] | None = None,
                    query_batch: int = QUERY_BATCH) -> Iterator[Pairs]:
    """Every pair of items whose vectors' inner product is at least ``threshold``, each pair once.

    ``progress`` is called with the number of items of each batch once it is done (tqdm's ``update``).
    """
    threshold = check_threshold(threshold)
    limit = np.float32(threshold)
    radius = float(np.nextafter(limit, np.float32(-np.inf)))  # FAISS keeps scores strictly above the radius
    index: faiss.IndexFlatIP | None = None
    ids_seen = np.zeros(0, np.int64)  # position in the index -> id
    for ids, vectors in batches:
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0 and len(vectors) == 0:
            continue
        if index is None:
            index = faiss.IndexFlatIP(np.shape(vectors)[-1])
        vectors = normalise(vectors, index.d)
        if ids.shape != (len(vectors),):
            raise BadInput(f"{len(vectors)} vectors but {ids.size} ids in one batch")
        start = index.ntotal
        index.add(vectors)
        ids_seen = np.concatenate([ids_seen, ids])
        for offset in range(0, len(vectors), query_batch):
            lims, scores, found = index.range_search(vectors[offset : offset + query_batch], radius)
            own = start + offset + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
            keep = (found < own) & (scores >= limit)  # earlier items only: each pair once, never itself
            yield Pairs(ids_seen[found[keep]], ids_seen[own[keep]], scores[keep])
        if progress is not None:
            progress(len(vectors))


def find_duplicates(batches: Batches, threshold: float,
                    progress: Callable[[int], object] | None = None) -> Report:
    """The groups of near-duplicates in a collection read as ``batches`` (see ``duplicate_pairs``)."""
    counted = _Counted(batches)
    groups = _UnionFind()
    pairs = 0
    for chunk in duplicate_pairs(counted, threshold, progress):
        pairs += len(chunk.scores)
        for a, b, score in zip(chunk.first.tolist(), chunk.second.tolist(), chunk.scores.tolist()):
            groups.join(a, b, score)
    return Report(check_threshold(threshold), counted.items, pairs, groups.groups())


def fold_duplicates(hits: Sequence[T], vectors: np.ndarray, threshold: float) -> list[tuple[T, list[T]]]:
    """Search results (best first, with their unit vectors) with the near-identical ones folded: each hit is
    compared with the hits kept before it and folded into the first (best ranked) one it is at least
    ``threshold`` similar to, else kept. Returns each kept hit with the hits folded into it, order kept."""
    threshold = check_threshold(threshold)
    vectors = np.asarray(vectors, np.float64)  # a k x k product: float64 costs nothing and rounds less
    if len(vectors) != len(hits):
        raise ValueError(f"{len(hits)} hits but {len(vectors)} vectors")
    similar = vectors @ vectors.T >= threshold
    kept: list[int] = []
    folded: dict[int, list[T]] = {}
    for i in range(len(hits)):
        homes = np.nonzero(similar[i, kept])[0]
        if len(homes):
            folded[kept[int(homes[0])]].append(hits[i])
        else:
            kept.append(i)
            folded[i] = []
    return [(hits[i], folded[i]) for i in kept]


def search_folded(store: VectorIndex, queries: Any, k: int, threshold: float,
                  **options: Any) -> list[list[tuple[Hit, list[Hit]]]]:
    """Top-``k`` per query with near-identical results folded (``fold_duplicates``): ``k`` kept hits per query
    while the collection has them. Each query starts at 2k results and fetches 4x more while folding leaves fewer
    than ``k`` kept and more results exist, up to MAX_K and MAX_FOLDED over all queries; ``options`` go to
    ``search``."""
    threshold = check_threshold(threshold)
    queries = normalise(queries, store.dim, "query vectors")
    ceiling = max(min(2 * k, MAX_K), min(MAX_K, MAX_FOLDED // len(queries)))
    answer: list[list[tuple[Hit, list[Hit]]]] = [[] for _ in queries]
    pending, fetch = list(range(len(queries))), min(2 * k, ceiling)
    while pending:
        rows = store.search(queries[pending], fetch, **options)
        vectors = _hit_vectors(store, rows)
        if vectors is None:
            continue  # an item was deleted between the search and the read: search again
        short = []
        for at, row in zip(pending, rows):
            stacked = np.asarray([vectors[hit.id] for hit in row], np.float32).reshape(len(row), store.dim)
            folded = fold_duplicates(row, stacked, threshold)
            answer[at] = folded[:k]
            if len(folded) < k and len(row) == fetch < ceiling:  # a full page: the collection may hold more
                short.append(at)
        pending, fetch = short, min(4 * fetch, ceiling)
    return answer


def _hit_vectors(store: VectorIndex, rows: list[list[Hit]]) -> dict[int, np.ndarray] | None:
    """The stored vector of every hit of ``rows``, by id, in one read; None if one of them is gone."""
    found = sorted({hit.id for row in rows for hit in row})
    try:
        return dict(zip(found, store.vectors(found))) if found else {}
    except NotFound:
        return None


class _Counted:
    """Batches passed through, counting their items."""

    def __init__(self, batches: Batches) -> None:
        self.batches, self.items = batches, 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, vectors in self.batches:
            self.items += len(ids)
            yield ids, vectors


class _UnionFind:
    """Connected components over the items that have a pair, with each item's best score."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.best: dict[int, float] = {}

    def root(self, item: int) -> int:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:  # path halving keeps the trees shallow
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def join(self, a: int, b: int, score: float) -> None:
        for item in (a, b):
            self.best[item] = max(self.best.get(item, score), score)
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller id leads: groups come out the same every run

    def groups(self) -> list[Group]:
        members: dict[int, list[int]] = {}
        for item in sorted(self.parent):
            members.setdefault(self.root(item), []).append(item)
        return [Group(ids, [self.best[i] for i in ids]) for _, ids in sorted(members.items())]
