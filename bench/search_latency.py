"""Search latency of IndexStore at 10k and 100k stored vectors (single-query p50/p99, kind chosen by size).

    python bench/search_latency.py --sizes 10000 100000 --dim 256 --queries 500 --threads 1 --data clustered random

Two kinds of data: ``random`` unit Gaussians (no structure: HNSW's worst case, every point about
equally far from every other) and ``clustered``, a Gaussian mixture (``--clusters`` centres, each point
its centre plus noise of norm ``--spread``) shaped like real embeddings, which group by content.
Queries are stored vectors plus small noise; recall@10 is the store's own figure (sample vs exact).

Single queries with OpenMP threads on a busy machine spin-wait: on 2 loaded cores --threads 2 was
~100x slower at p50 than --threads 1, hence the service's 1 thread per query.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import numpy as np

from corinfomax.serving.index.store import IndexStore


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
    centres = unit(rng, clusters, dim)
    x = centres[rng.integers(0, clusters, n)] + spread * unit(rng, n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (the service uses 1)")
    parser.add_argument("--data", nargs="+", choices=["clustered", "random"], default=["clustered", "random"])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.6,
                        help="noise norm around a cluster centre (centres have norm 1)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'data':>9} {'size':>8} {'kind':>10} {'param':>8} {'recall@10':>9} {'build s':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'flat p50':>8}")
    for kind, size in [(kind, size) for kind in args.data for size in args.sizes]:
        with tempfile.TemporaryDirectory() as folder, IndexStore(folder, dim=args.dim) as store:
            data = unit(rng, size, args.dim) if kind == "random" else clustered(rng, size, args.dim, args.clusters,
                                                                                 args.spread)
            store.add_many(((data[i : i + 10_000], None, None) for i in range(0, size, 10_000)), rebuild=False)
            figures = store.rebuild()
            queries = data[rng.choice(size, args.queries)] + 0.05 * unit(rng, args.queries, args.dim)
            times = []
            for query in queries:
                start = time.perf_counter()
                store.search(query, args.k)
                times.append((time.perf_counter() - start) * 1000)
            store.rebuild("Flat")
            flat = []
            for query in queries[:100]:
                start = time.perf_counter()
                store.search(query, args.k)
                flat.append((time.perf_counter() - start) * 1000)
            param = (f"ef {figures['ef_search']}" if figures.get("ef_search") else
                     f"np {figures['nprobe']}" if figures.get("nprobe") else "-")
            print(f"{kind:>9} {size:>8} {figures['kind']:>10} {param:>8} {figures['recall_at_10']:>9.3f} "
                  f"{figures['build_seconds']:>8.1f} "
                  f"{np.percentile(times, 50):>7.2f} {np.percentile(times, 99):>7.2f} {np.percentile(flat, 50):>8.2f}")


if __name__ == "__main__":
    main()
