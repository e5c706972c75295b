"""The index at scale: insert rate, single-query search p50/p99, recall@10 and memory per storage backend.

    python bench/index_scale.py --sizes 100000 1000000 --dim 256 --queries 500 --data clustered

Two kinds of data: ``clustered``, a Gaussian mixture (``--clusters`` centres, each point its centre plus
noise of norm ``--spread``) shaped like real embeddings, which group by content, and ``random`` unit
Gaussians (no structure: HNSW's worst case, every point about equally far from every other).

Per backend and size, measured in one run: the fill rate (vectors/s from empty to searchable, as
`corinfomax index build` fills each backend: batches of 10,000, then the FAISS build), online adds into the
filled index (batches of 32, as `/add` does), search p50/p99 at k=10 for new points of the same distribution
(one query per call, as the service does), recall@10 of those answers against exact search over the same
vectors (computed here with a FAISS Flat index, not the store's own figure), and the memory the backend
holds (RSS of this process and its children after the fill, less before the store was opened; the data
array is made before). Milvus Lite is measured up to ``--lite-max`` only: its searches walk every row.

Single queries with OpenMP threads on a busy machine spin-wait: on 2 loaded cores --threads 2 was ~100x
slower at p50 than --threads 1, hence the service's 1 thread per query.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import psutil

from corinfomax.serving.index.backend import VectorIndex
from corinfomax.serving.index.factory import open_index
from corinfomax.serving.index.store import IndexStore

BULK_BATCH = 10_000
ONLINE_BATCH, ONLINE_ADDS = 32, 2_000


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + spread * unit(rng, n, centres.shape[1])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mib() -> float:
    """Resident memory of this process and its children (a backend may run a server process)."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def kth_scores(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact k-th best inner product per query."""
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat.search(queries, k)[0][:, -1]


# Recall is judged by score, not id, because backends number items differently: a hit is a true top-k
# neighbour when it scores at least the exact k-th score, less float32 rounding of a unit-vector dot product.
SCORE_SLACK = 1e-5


def recall_at(found: list[list[float]], kth: np.ndarray, k: int) -> float:
    return sum(sum(s >= t - SCORE_SLACK for s in f[:k]) for f, t in zip(found, kth)) / (k * len(kth))


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def timed_search(store: VectorIndex, queries: np.ndarray, k: int) -> tuple[list[float], list[list[float]]]:
    times, found = [], []
    for query in queries:
        start = time.perf_counter()
        hits = store.search(query, k)[0]
        times.append((time.perf_counter() - start) * 1000)
        found.append([h.score for h in hits])
    return times, found


def embedded(folder: Path, data: np.ndarray) -> tuple[VectorIndex, dict[str, object]]:
    """The SQLite + FAISS store filled as `corinfomax index build --out` does: bulk rows, then one build."""
    store = IndexStore(folder / "index", dim=data.shape[1])
    store.add_many(((data[i : i + BULK_BATCH], None, None) for i in range(0, len(data), BULK_BATCH)), rebuild=False)
    return store, store.rebuild()


def milvus_lite(folder: Path, data: np.ndarray) -> tuple[VectorIndex, dict[str, object]]:
    """A Milvus Lite file filled as `corinfomax index build --to` does: one insert per batch, indexed as it goes."""
    store = open_index(folder / "index.db", dim=data.shape[1])
    for i in range(0, len(data), BULK_BATCH):
        store.add(data[i : i + BULK_BATCH])
    return store, store.stats()


BACKENDS: dict[str, Callable[[Path, np.ndarray], tuple[VectorIndex, dict[str, object]]]] = {
    "embedded": embedded, "milvus-lite": milvus_lite}


def measure(backend: str, data: np.ndarray, extra: np.ndarray, queries: np.ndarray, kth: np.ndarray,
            k: int) -> dict[str, object]:
    size = len(data)
    before = rss_mib()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        store, figures = BACKENDS[backend](Path(folder), data)
        with store:
            filled_s = time.perf_counter() - start
            memory = rss_mib() - before
            times, found = timed_search(store, queries, k)
            start = time.perf_counter()
            for i in range(0, len(extra), ONLINE_BATCH):
                store.add(extra[i : i + ONLINE_BATCH])
            online = len(extra) / (time.perf_counter() - start)
    p50, p99 = percentiles(times)
    param = (f"ef {figures['ef_search']}" if figures.get("ef_search") else
             f"np {figures['nprobe']}" if figures.get("nprobe") else "-")
    return {"kind": f"{figures['kind']} {param}", "fill": size / filled_s, "online": online,
            "recall": recall_at(found, kth, k), "p50": p50, "p99": p99, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=sorted(BACKENDS))
    parser.add_argument("--lite-max", type=int, default=100_000,
                        help="largest size given to Milvus Lite (its searches walk every row in Python)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (the service uses 1)")
    parser.add_argument("--data", nargs="+", choices=["clustered", "random"], default=["clustered"])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.6,
                        help="noise norm around a cluster centre (centres have norm 1)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = unit(rng, args.clusters, args.dim)

    def draw(n: int, kind: str) -> np.ndarray:
        return unit(rng, n, args.dim) if kind == "random" else clustered(rng, centres, n, args.spread)

    print(f"{'data':>9} {'size':>8} {'backend':>11} {'kind':>16} {'fill/s':>7} {'add/s':>7} "
          f"{'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7} {'MiB':>6}", flush=True)
    for kind in args.data:
        for size in args.sizes:
            data, extra, queries = draw(size, kind), draw(ONLINE_ADDS, kind), draw(args.queries, kind)
            kth = kth_scores(data, queries, args.k)
            for backend in args.backends:
                if backend == "milvus-lite" and size > args.lite_max:
                    print(f"{kind:>9} {size:>8} {backend:>11}  skipped: above --lite-max", flush=True)
                    continue
                r = measure(backend, data, extra, queries, kth, args.k)
                print(f"{kind:>9} {size:>8} {backend:>11} {r['kind']:>16} {r['fill']:>7.0f} {r['online']:>7.0f} "
                      f"{r['recall']:>9.3f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
                      f"{r['memory']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
