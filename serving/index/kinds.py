"""Which FAISS index a collection gets (by size and memory budget) and how widely it must search to reach the
recall target: the choices the embedded index's FAISS cache (`serving.index.store_faiss`) delegates here."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import faiss
import numpy as np

from corinfomax.core.errors import BadInput

FLAT_MAX = 20_000  # exact search is fast enough up to here (about 1 ms per query at D=256)
HNSW_MAX = 2_000_000  # above this HNSW build time becomes the bottleneck; IVF trains on a sample
RECALL_TARGET = 0.95  # nprobe / efSearch are raised until recall@10 on the sample reaches this
RECALL_SAMPLE = 256  # queries used to measure recall@10 against exact search
TRAIN_PER_LIST = 64  # IVF training points per list (FAISS warns below 39)
TRAIN_MAX = 200_000


def choose_kind(count: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """Pick a FAISS factory string by collection size and memory (autofaiss-style rules).

    Flat (exact) while small; HNSW32 while its graph plus raw vectors fit the budget; IVF-Flat when
    raw vectors fit; IVF-PQ (compressed codes) otherwise.
    """
    budget = memory_budget_bytes or default_memory_budget()
    flat_bytes = count * dim * 4
    if count <= FLAT_MAX and flat_bytes <= budget:
        return "Flat"
    hnsw_bytes = count * (dim * 4 + 32 * 2 * 4 + 16)
    if count <= HNSW_MAX and hnsw_bytes <= budget:
        return "HNSW32"
    nlist = ivf_lists(count)
    if flat_bytes <= budget:
        return f"IVF{nlist},Flat"
    for m in (64, 32, 16, 8, 4):
        if dim % m == 0 and count * (m + 8) <= budget:
            return f"IVF{nlist},PQ{m}"
    raise BadInput(f"{count} vectors of dim {dim} do not fit a memory budget of {budget} bytes, even as PQ4 codes")


def candidates(count: int, dim: int, memory_budget_bytes: int | None = None) -> list[str]:
    """`choose_kind`'s pick, then the kinds to try, in order, while one misses `RECALL_TARGET`.

    HNSW can stay under the target at its widest search: on random vectors at 100k, and on clustered ones at
    1M (1000 Gaussian clusters: 0.947 at efSearch 1024), where exact search takes 128 ms a query. IVF-Flat
    over the same vectors reaches it by probing more lists (that 1M: recall 1.0 at nprobe 8 of 4096, 0.5 ms;
    `bench/index_scale.py`), and at worst scans every list, about as fast as exact search; exact Flat is
    last, for a target IVF cannot reach. Compressed kinds have no fallback: the raw vectors do not fit.
    """
    first = choose_kind(count, dim, memory_budget_bytes)
    if first == "Flat" or ",PQ" in first:
        return [first]
    return list(dict.fromkeys([first, f"IVF{ivf_lists(count)},Flat", "Flat"]))


def ivf_lists(count: int) -> int:
    """About 4*sqrt(N) lists (a power of two), with enough training points per list."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return max(1, min(nlist, count // TRAIN_PER_LIST))


def default_memory_budget() -> int:
    """A quarter of physical memory (the index shares the machine with the model and workers)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


def ivf_lists_of(kind: str) -> int:
    """The number of IVF lists in a factory string (1 for kinds without lists)."""
    head = kind.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 1


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids found (rows of ids; -1 marks an empty slot)."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / max(1, truth.size)


def with_ids(base: faiss.Index) -> faiss.Index:
    """``base`` able to hold our ids: an IVF index holds them itself; others (Flat, HNSW) in an IndexIDMap2.

    An IVF index must not go in the map: removing ids from it keeps its list entries' positions while the map
    closes the gap, so every id after a removed one would answer for its neighbour."""
    return base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap2(base)


def holds_vectors(kind: str | None) -> bool:
    """Whether an index of ``kind`` keeps the vectors as they were added (Flat, HNSW over flat storage,
    IVF-Flat), so reading them back from it is exact; compressed kinds (PQ, SQ) keep approximations."""
    return kind is not None and re.fullmatch(r"Flat|HNSW\d+|IVF\d+,Flat", kind) is not None


def readable(index: faiss.Index, kind: str | None) -> faiss.Index:
    """``index`` (of ``kind``) able to give back a vector by id where it holds them (``holds_vectors``): an IVF
    index keeps a table from id to list entry (about 21 bytes per item) beside its lists."""
    ivf = faiss.try_extract_index_ivf(index)
    if holds_vectors(kind) and ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def base_of(index: faiss.Index) -> faiss.Index:
    """The index under ``with_ids``' map, if any."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Recall@10 of ``index`` against the exact ``truth``; for IVF and HNSW, the narrowest search (nprobe,
    efSearch) that reaches `RECALL_TARGET`, or the widest tried."""
    inner = base_of(index)

    def recall(params: faiss.SearchParameters | None) -> float:
        _, found = index.search(queries, 10, params=params) if params else index.search(queries, 10)
        return recall_at(found, truth)

    if isinstance(inner, faiss.IndexIVF):
        nprobe = 1
        while True:
            value = recall(faiss.SearchParametersIVF(nprobe=nprobe))
            if value >= RECALL_TARGET or nprobe >= inner.nlist:
                return {"recall_at_10": round(value, 4), "nprobe": nprobe}
            nprobe = min(nprobe * 2, inner.nlist)
    if isinstance(inner, faiss.IndexHNSW):
        ef = 16
        while True:
            value = recall(faiss.SearchParametersHNSW(efSearch=ef))
            if value >= RECALL_TARGET or ef >= 1024:
                return {"recall_at_10": round(value, 4), "ef_search": ef}
            ef *= 2
    return {"recall_at_10": round(recall(None), 4)}
