"""The whole-collection duplicates job at scale: time and peak memory of ``duplicates.find_duplicates``.

    python -m bench.duplicates_scale --items 100000 --dim 256 --threshold 0.95

Synthetic clustered unit vectors (``bench/index_scale.py``'s mixture: ``--clusters`` centres, noise norm
``--spread``), of which ``--planted`` (a fraction) are replaced by near-copies of other items (similarity
about 0.98), read in batches of 50,000 as the folder backend's scan reads SQLite. Memory is the peak resident
size of this process (``getrusage`` maxrss) after the job against its resident size just before (the data
array, N x D float32, exists before): the difference is what the job adds at its peak (its own copy of the
vectors in FAISS, one batch's range-search results, the pairs).
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss
import numpy as np
import psutil
from tqdm import tqdm

from bench.index_scale import clustered, unit
from corinfomax.serving.index.duplicates import find_duplicates

SCAN_BATCH = 50_000  # rows per read of the folder backend's SQLite scan (store_sqlite.READ_BATCH)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def collection(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, copy rows, their source rows), drawn in chunks so that drawing peaks barely above the data."""
    rng = np.random.default_rng(0)
    centres = unit(rng, args.clusters, args.dim)
    vectors = np.empty((args.items, args.dim), np.float32)
    for start in range(0, args.items, 10_000):
        rows = min(10_000, args.items - start)
        vectors[start : start + rows] = clustered(rng, centres, rows, args.spread)
    copies = rng.choice(args.items, size=int(args.items * args.planted), replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(args.items), copies), size=len(copies))
    noise = unit(rng, len(copies), args.dim) * 0.2  # cos ~ 1 / sqrt(1 + 0.2^2) ~ 0.98
    vectors[copies] = vectors[sources] + noise
    vectors[copies] /= np.linalg.norm(vectors[copies], axis=1, keepdims=True)
    return vectors, copies, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--planted", type=float, default=0.01, help="fraction of items that are near-copies")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    vectors, copies, sources = collection(args)
    ids = np.arange(1, args.items + 1, dtype=np.int64)
    before = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    with tqdm(total=args.items, desc="duplicates", unit="item") as bar:
        report = find_duplicates(((ids[i : i + SCAN_BATCH], vectors[i : i + SCAN_BATCH])
                                  for i in range(0, args.items, SCAN_BATCH)), args.threshold, bar.update)
    seconds = time.perf_counter() - started
    grouped = {i: g for g in report.groups for i in g.ids}
    found = sum(grouped.get(int(ids[c])) is grouped.get(int(ids[s]), 0) for c, s in zip(copies, sources))
    print(f"{args.items} items, dim {args.dim}, threshold {args.threshold}, FAISS threads "
          f"{faiss.omp_get_max_threads()}: {seconds:.1f} s, {report.pairs} pairs in {len(report.groups)} groups, "
          f"{found}/{len(copies)} planted copies grouped with their source; RSS {before:.0f} MiB before (with the "
          f"data), peak {peak_mib():.0f} MiB (+{peak_mib() - before:.0f} MiB)")


if __name__ == "__main__":
    main()
