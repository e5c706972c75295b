"""Search in the embedded index: the FAISS query (with the tuned nprobe or efSearch, an optional set of allowed
ids, and ids deleted from an HNSW graph skipped inside the search), then the hits' metadata and labels from
SQLite, the answer's size checked before any metadata is parsed."""

from __future__ import annotations

import json

import faiss
import numpy as np

from corinfomax.serving.index.backend import Hit, check_answer_size
from corinfomax.serving.index.store_faiss import FaissCache
from corinfomax.serving.index.store_sqlite import Database

# Per query: (id, score) of the hits in rank order; per hit id: (metadata JSON text, label).
Ranked = list[list[tuple[int, float]]]
Texts = dict[int, tuple[str, str | None]]


def nearest(cache: FaissCache, db: Database, queries: np.ndarray, k: int,
            allowed: np.ndarray | None = None) -> tuple[Ranked, Texts]:
    """Top-``k`` ids per query (unit vectors), only among ``allowed`` ids if given; the caller holds the lock."""
    index = cache.current()
    if index.ntotal == 0:
        return [[] for _ in queries], {}
    params = search_params(cache.meta, allowed, cache.hidden())
    fetch = min(index.ntotal, k)
    scores, ids = index.search(queries, fetch, params=params) if params else index.search(queries, fetch)
    wanted = {int(i) for i in ids.ravel() if i >= 0}
    texts = db.texts(wanted)
    ranked = [[(int(i), float(s)) for s, i in zip(srow, irow) if int(i) in texts][:k]
              for srow, irow in zip(scores, ids)]
    return ranked, texts


def search_params(meta: dict, allowed: np.ndarray | None,
                  hidden: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """The tuned search breadth of the cache's kind (``faiss.json``) and the id filter: only ``allowed`` ids if
    given, never the ``hidden`` ones (``FaissCache.hidden``: deleted from an HNSW graph, which cannot remove
    them). Skipping them inside the search, rather than fetching k more per hidden id, keeps a 100k-item HNSW32
    with 5% deleted near its speed without deletes (bench/online_build.py)."""
    nprobe, ef = meta.get("nprobe"), meta.get("ef_search")
    selector: faiss.IDSelector | None = faiss.IDSelectorBatch(allowed) if allowed is not None else None
    if hidden is not None:
        selector = hidden if selector is None else faiss.IDSelectorAnd(selector, hidden)
    if nprobe:
        return faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector)
    if ef:
        return faiss.SearchParametersHNSW(efSearch=int(ef), sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def hits(ranked: Ranked, texts: Texts) -> list[list[Hit]]:
    """The answer: refused (413) if its metadata is over the limit, else parsed once per distinct item."""
    check_answer_size(sum(len(texts[i][0]) for row in ranked for i, _ in row))
    parsed = {i: json.loads(text) for i, (text, _) in texts.items()}
    return [[Hit(i, s, parsed[i], texts[i][1]) for i, s in row] for row in ranked]
