"""Filtered search at scale on the folder index: p50/p99 and recall@10 at several selectivities against unfiltered
search of the same index, measured side by side in one run.

    python -m bench.filter_scale --size 1000000 --dim 256 --queries 200

The items are clustered unit vectors (a Gaussian mixture, like index_scale's ``clustered``) with one metadata
field ``b``, uniform in 0..99,999, indexed with ``IndexStore.index_field`` as a user would with /index_field;
a selectivity of s is the filter ``{"metadata.b": {"lt": s * 100000}}``. The queries are new points of the same
mixture, one per call (as the service searches). Recall@10 is against exact search over the passing items
(NumPy, float32 inner products of unit vectors: ties at the 10th place are as rare as in the data). The
ratio column is p50 filtered / p50 unfiltered (goal: at most 2). Build time is not reported (index_scale
measures it). On a shared machine the timings are not figures to publish: say so beside them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from corinfomax.serving.index import store_filter
from corinfomax.serving.index.filters import Filter, parse_filter
from corinfomax.serving.index.store import IndexStore

BUCKETS = 100_000
SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)


def mixture(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    noise = rng.normal(size=(n, centres.shape[1])).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + spread * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill(folder: Path, vectors: np.ndarray, buckets: np.ndarray, kind: str | None,
         batch: int = 10_000) -> IndexStore:
    store = IndexStore(folder, dim=vectors.shape[1])
    store.add_many(((vectors[i : i + batch], [{"b": int(b)} for b in buckets[i : i + batch]], None)
                    for i in range(0, len(vectors), batch)), rebuild=False)
    store.rebuild(kind)
    field = parse_filter({"metadata.b": 0})
    assert field is not None and hasattr(field.root, "field")
    store.index_field(field.root.field)
    return store


def measure(store: IndexStore, queries: np.ndarray, truth: np.ndarray, flt: Filter | None) -> tuple[float, float,
                                                                                                     float]:
    """(p50 ms, p99 ms, recall@10) of one query per call."""
    times, hits = [], 0
    for query, expected in zip(queries, truth):
        started = time.perf_counter()
        row = store.search(query[None, :], 10, where=flt)[0]
        times.append(time.perf_counter() - started)
        hits += len({hit.id for hit in row} & set(expected.tolist()))
    p50, p99 = np.percentile(np.asarray(times) * 1000, [50, 99])
    return float(p50), float(p99), hits / truth.size


def exact(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Exact top-10 ids per query among the rows ``keep``, in blocks of queries (bounded memory)."""
    out, passing, passing_ids = [], vectors[keep], ids[keep]
    for start in range(0, len(queries), 16):
        scores = queries[start : start + 16] @ passing.T
        out.append(passing_ids[np.argsort(-scores, axis=1)[:, :10]])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default=None, help="FAISS index kind (default: as `index build` picks it)")
    parser.add_argument("--exact-max", type=int, nargs="+", default=[store_filter.EXACT_MAX],
                        help="expected passing items up to which they are scored exactly (store_filter.EXACT_MAX); "
                             "several: one table each, to choose the default from")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)  # one query per call, as the service runs FAISS (index_owner.one_openmp_thread)
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    vectors = mixture(rng, centres, args.size, args.spread)
    queries = mixture(rng, centres, args.queries, args.spread)
    buckets = rng.integers(0, BUCKETS, args.size)
    with tempfile.TemporaryDirectory() as folder:
        store = fill(Path(folder) / "index", vectors, buckets, args.kind)
        ids = store.id_list()
        stats = store.stats()
        print(f"{args.size} vectors of {args.dim} dims, kind {stats['kind']}, recall@10 (its sample) "
              f"{stats['recall_at_10']}; {args.queries} queries, k=10, one per call")
        everything = exact(vectors, ids, queries, np.ones(len(ids), bool))
        measure(store, queries, everything, None)  # a pass untimed: the first after a build ran 1.5-2.5x slower
        base = measure(store, queries, everything, None)
        truths = {share: exact(vectors, ids, queries, buckets < share * BUCKETS) for share in SELECTIVITIES}
        for exact_max in args.exact_max:
            store_filter.EXACT_MAX = exact_max
            print(f"EXACT_MAX {exact_max}")
            print(f"{'selectivity':>12} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>10} {'p50 / unfiltered':>17}")
            print(f"{'none':>12} {base[0]:8.2f} {base[1]:8.2f} {base[2]:10.3f} {1.0:17.2f}")
            for share in SELECTIVITIES:
                flt = parse_filter({"metadata.b": {"lt": int(share * BUCKETS)}})
                p50, p99, recall = measure(store, queries, truths[share], flt)
                print(f"{share:12.1%} {p50:8.2f} {p99:8.2f} {recall:10.3f} {p50 / base[0]:17.2f}")
        store.close()


if __name__ == "__main__":
    main()
