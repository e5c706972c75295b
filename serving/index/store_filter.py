"""Filtered search in the embedded index: the top-k among the items a filter lets through, exactly as an exact
search over those items alone would rank them (up to the FAISS index's own recall), at every selectivity.

SQLite says which items pass (``filter_compile.to_sql``; an expression index on a metadata field makes that
a lookup, ``IndexStore.index_field``). Two ways to rank them, chosen by how many are expected to pass:
- few (at most ``EXACT_MAX``, or more while that costs less than the other way's first search, ``first_scan``):
  read the passing rows' vectors (from the FAISS copy when it holds them exactly, else from SQLite) and score
  them exactly. A FAISS id selector on an HNSW or IVF index would walk a graph or lists where almost nothing is
  allowed, and lose recall just where the set is smallest.
- many: a FAISS search with ``fetch`` results per query, sized from the expected fraction (an IVF index probing
  lists in proportion, ``deeper``), the ids checked against the filter in SQLite, widened ``WIDEN``-fold until
  every query has k passing hits or FAISS has no more to give. A query still short then (an IVF index whose
  probed lists ran out, or ``FETCH_MAX`` reached) is answered by the exact way, so the answer never stops short
  of k while k items pass.
The expected count comes from a random sample of rows kept in memory (``Selectivity``): a wrong estimate
costs time, never correctness, so the sample is refreshed only when the item count moved by a tenth.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Sequence

import numpy as np

from corinfomax.serving.index import kinds
from corinfomax.serving.index.filter_compile import to_sql
from corinfomax.serving.index.filters import Filter, estimate_fraction
from corinfomax.serving.index.store_faiss import FaissCache, exact_top
from corinfomax.serving.index.store_search import Ranked, search_params
from corinfomax.serving.index.store_sqlite import Database

# Expected passing items up to which they are scored exactly. Where the two ways cross (bench/filter_scale.py,
# 100k HNSW items of 128 dims, a busy shared machine, so only the order of magnitude): 1,000 passing items
# took 2.6 ms exactly vs 4.6 ms widening, 10,000 took 56 ms vs 12 ms.
EXACT_MAX = 4_000
# Beyond EXACT_MAX, the exact way is still taken while it costs less than the widening's first search (where
# FAISS holds the vectors): an item scored exactly (id from SQLite's index, vector from FAISS) took 0.57 us, a
# vector an IVF search compares with 0.083 us (bench/filter_scale.py, quiet: 2,000 items in 1.45 ms at 200k;
# 1% of 1M widened over 78% of the lists in 65 ms, where scoring its 10,000 items exactly costs a tenth of that).
SCANNED_PER_EXACT = 7
SAMPLE_ROWS = 2_000  # rows in the selectivity sample: a fraction of 1% is seen ~20 times
OVERFETCH = 4  # the first FAISS fetch: this many times the k passing hits the expected fraction gives
WIDEN = 4  # growth of the FAISS fetch per round
FETCH_MAX = 1 << 16  # per query; beyond it the exact way is cheaper than another round
SCORES_MAX = 1 << 22  # scores held at once (queries x rows), 16 MiB of float32, whatever the request's shape
KNOWN_FILTERS = 1024  # estimates kept (then forgotten all at once)
LABELLED = "label IS NOT NULL"


class Selectivity:
    """A random sample of rows (id, label, metadata) kept to estimate the fraction of items a filter passes."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str | None, dict[str, Any]]] = []
        self.count = -1
        self.known: dict[Filter, float] = {}  # per filter: evaluating it on the sample costs ~1 ms

    def fraction(self, db: Database, flt: Filter, count: int) -> float:
        if abs(count - self.count) * 10 > max(self.count, 1):
            self.rows = [(i, label, json.loads(meta)) for i, label, meta in db.sample_rows(SAMPLE_ROWS)]
            self.count = count
            self.known.clear()
        if flt not in self.known:
            if len(self.known) >= KNOWN_FILTERS:
                self.known.clear()
            matched, sampled = estimate_fraction(flt, self.rows)
            self.known[flt] = matched / sampled if sampled else 0.0
        return self.known[flt]


def condition(flt: Filter | None, labelled_only: bool) -> tuple[str, list[Any]]:
    """The SQL condition (and its parameters) of a filter, and of ``labelled_only`` (a filter on the label)."""
    where, params = to_sql(flt) if flt is not None else ("1", [])
    return (f"({where}) AND {LABELLED}" if labelled_only else where), list(params)


def nearest_where(cache: FaissCache, db: Database, selectivity: Selectivity, queries: np.ndarray, k: int,
                  flt: Filter, labelled_only: bool) -> Ranked:
    """Top-``k`` (id, score) per query among the items ``flt`` passes; the caller holds the store's lock."""
    where, params = condition(flt, labelled_only)
    # The FAISS copy is current (the caller holds the lock) and knows its size: SQLite's COUNT(*) walks the
    # table, 0.3 ms at 200,000 items, as much as a whole unfiltered search.
    count = int(cache.current().ntotal) - len(cache.tombstones)
    fraction = selectivity.fraction(db, flt, count)
    cheaper = first_scan(cache, count, k, fraction) / SCANNED_PER_EXACT if cache.holds_vectors() else 0
    if fraction * count <= max(EXACT_MAX, cheaper):
        return exact(cache, db, queries, k, where, params)
    return widening(cache, db, queries, k, where, params, fraction)


def first_scan(cache: FaissCache, count: int, k: int, fraction: float) -> float:
    """About how many vectors ``widening``'s first FAISS search compares a query with: an IVF index's share of
    the lists it probes; a flat index all; HNSW about the fetch (a lower bound: the exact way is then chosen
    only as far as ``EXACT_MAX``)."""
    fetch = first_fetch(count, k, fraction)
    nprobe = deeper(cache.meta, fetch / k).get("nprobe")
    if nprobe:
        return count * int(nprobe) / kinds.ivf_lists_of(str(cache.meta.get("kind")))
    return count if cache.meta.get("kind") == "Flat" else fetch


def first_fetch(count: int, k: int, fraction: float) -> int:
    """The widening's first FAISS fetch: ``OVERFETCH`` times the results that hold ``k`` passing ones."""
    return min(count, math.ceil(OVERFETCH * k / max(fraction, 1e-9)))


def exact(cache: FaissCache, db: Database, queries: np.ndarray, k: int, where: str, params: Sequence[Any]) -> Ranked:
    """Exact top-``k`` over the rows where ``where`` holds, in batches sized so that one batch's scores for every
    query stay within ``SCORES_MAX``."""
    batch = max(256, SCORES_MAX // len(queries))
    scores, ids = exact_top(queries, passing_vectors(cache, db, where, params, batch), k)
    return [[(int(i), float(s)) for s, i in zip(srow, irow)] for srow, irow in zip(scores, ids)]


def passing_vectors(cache: FaissCache, db: Database, where: str, params: Sequence[Any],
                    batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of the rows where ``where`` holds: the ids from SQLite (an index on the filtered field
    answers them alone) and the vectors from the FAISS copy where it holds them exactly, else from SQLite."""
    if not cache.holds_vectors():
        yield from db.matching(cache.dim, where, params, batch)
        return
    for ids in db.matching_ids(where, params, batch):
        yield ids, cache.vectors(ids)


def widening(cache: FaissCache, db: Database, queries: np.ndarray, k: int, where: str, params: Sequence[Any],
             fraction: float) -> Ranked:
    """FAISS search with a post-filter, widened until each query has ``k`` passing hits or FAISS is exhausted."""
    total = int(cache.current().ntotal)
    fetch = first_fetch(total, k, fraction)
    rows: list[list[tuple[int, float]] | None] = [None] * len(queries)
    while pending := [q for q, row in enumerate(rows) if row is None]:
        exhausted = fetch >= min(total, FETCH_MAX)
        short = []
        step = max(1, SCORES_MAX // fetch)  # queries per FAISS call: its answer is queries x fetch
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            for q, row, complete in _post_filtered(cache, db, queries[chunk], k, fetch, where, params, chunk):
                if len(row) == k:
                    rows[q] = row
                elif exhausted or not complete:
                    short.append(q)
        if short:  # FAISS has no more to give these queries: rank their passing items exactly
            for q, row in zip(short, exact(cache, db, queries[short], k, where, params)):
                rows[q] = row
        fetch = min(total, FETCH_MAX, fetch * WIDEN)
    return [row or [] for row in rows]


def _post_filtered(cache: FaissCache, db: Database, queries: np.ndarray, k: int, fetch: int, where: str,
                   params: Sequence[Any], numbers: list[int]) -> Iterator[tuple[int, list[tuple[int, float]], bool]]:
    """Per query (its number): the passing hits among FAISS's top ``fetch``, at most ``k``, and whether FAISS gave
    all ``fetch`` (an IVF index whose probed lists ran out gives fewer)."""
    breadth = search_params(deeper(cache.meta, fetch / k), None, cache.hidden())
    index = cache.current()
    scores, ids = index.search(queries, fetch, params=breadth) if breadth else index.search(queries, fetch)
    passing = db.passing({int(i) for i in ids.ravel() if i >= 0}, where, params)  # deleted rows fail too
    for q, srow, irow in zip(numbers, scores, ids):
        yield q, [(int(i), float(s)) for s, i in zip(srow, irow) if int(i) in passing][:k], bool((irow >= 0).all())


def deeper(meta: dict[str, Any], depth: float) -> dict[str, Any]:
    """The cache's tuned search breadth for reading ``depth`` (fetch / k) times deeper than its top k. An IVF
    index's nprobe was tuned for the top k: to rank the passing items as deep down, it probes that many times the
    lists (up to all). Measured: a 6,000-item IVF32 test index at 1%, recall@10 0.86-0.99 growing nprobe by
    sqrt(1/f), 1.0 by 4/f; bench/filter_scale.py on 50,000 items in 1,000 tight clusters, IVF256 tuned to nprobe
    1, at 10%: 0.82 by 1/f, 0.94 by 4/f (such data defeats a post-filter on IVF; the bench shows where). HNSW needs
    nothing: FAISS searches it with efSearch at least the fetch."""
    if not meta.get("nprobe"):
        return meta
    lists = kinds.ivf_lists_of(str(meta.get("kind")))
    return {**meta, "nprobe": min(lists, math.ceil(int(meta["nprobe"]) * max(depth, 1.0)))}
