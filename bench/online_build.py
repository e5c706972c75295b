"""An index grown by writes past exact search, with searches running beside the writes: write and search latency
before, during and after the background FAISS build that replaces its exact (Flat) index, and search latency
with the exact index and the built one over the same items, in one run.

    python -m bench.online_build --size 100000 --dim 256 --rate 2000

Items are added 64 at a time (a re-embed job's batch, or a busy /add) at ``--rate`` items/s to a new, empty
folder index, as a re-embed fills its new generation, while a second thread searches one query at a time
(k=10, as the service does). Past ``kinds.FLAT_MAX`` the store builds the kind the size calls for in a
background thread. Then 5% of the items are deleted (an HNSW graph keeps them as tombstones, which each search
skips) and searched again; "exact" is the same store then rebuilt as Flat (what such an index stayed before
background builds). FAISS runs on one OpenMP thread, as in the service. The data are clustered unit vectors
(``bench.filter_scale.mixture``).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # as the service sets it (serving/api/__init__.py), before FAISS loads

import argparse  # noqa: E402
import itertools  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

from bench.filter_scale import mixture  # noqa: E402
from corinfomax.serving.index.store import IndexStore  # noqa: E402

BATCH = 64
PHASES = ("exact", "building", "built")


def line(name: str, times_ms: list[float]) -> str:
    if not times_ms:
        return f"  {name:28s}     none"
    return (f"  {name:28s} {len(times_ms):6d}  p50 {np.percentile(times_ms, 50):6.2f} ms  "
            f"p99 {np.percentile(times_ms, 99):6.2f} ms  max {max(times_ms):7.1f} ms")


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rate", type=float, default=2000.0, help="items added per second (0: as fast as possible)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim)).astype(np.float32)
    vectors, queries = mixture(rng, centres, args.size, 1.0), mixture(rng, centres, 200, 1.0)
    writes: dict[str, list[float]] = {phase: [] for phase in PHASES}
    searches: dict[str, list[float]] = {phase: [] for phase in PHASES}
    with tempfile.TemporaryDirectory() as tmp, IndexStore(Path(tmp) / "ix", dim=args.dim) as store:
        phase = ["exact"]
        done = threading.Event()

        def search_beside() -> None:
            for query in itertools.cycle(queries):
                if done.is_set():
                    return
                searches[phase[0]].append(timed(partial(store.search, query[None], k=10)))

        searcher = threading.Thread(target=search_beside)
        searcher.start()
        started = time.perf_counter()
        for start in range(0, args.size, BATCH):
            if args.rate:
                time.sleep(max(0.0, started + start / args.rate - time.perf_counter()))
            writes[phase[0]].append(timed(partial(store.add, vectors[start : start + BATCH])))
            if store.building():
                phase[0] = "building"
            elif phase[0] == "building":
                phase[0] = "built"
        store.wait_for_build()
        phase[0] = "built"
        settled_s = time.perf_counter() - started
        time.sleep(1.0)
        done.set()
        searcher.join()
        stats = store.stats()
        deleted = rng.choice(np.arange(1, args.size + 1), args.size // 20, replace=False)
        store.delete(sorted(deleted.tolist()))  # HNSW keeps them as tombstones, skipped inside each search
        after_deletes = [timed(partial(store.search, query[None], k=10)) for query in queries]
        store.rebuild("Flat")
        exact = [timed(partial(store.search, query[None], k=10)) for query in queries]
    print(f"{args.size:,} items of dim {args.dim} added {BATCH} at a time at {args.rate:.0f}/s, searched beside; "
          f"the build done at {settled_s:.1f} s: {stats['kind']}, recall@10 {stats['recall_at_10']:.3f}, "
          f"ef_search {stats['ef_search']}")
    for name in PHASES:
        print(line(f"write of {BATCH}, {name}", writes[name]))
    for name in PHASES:
        print(line(f"search k=10, {name}", searches[name]))
    print(line("search k=10, built, 5% deleted", after_deletes))
    print(line(f"search k=10, exact at {args.size * 19 // 20:,}", exact))
    print(f"  p50 exact / built: {np.percentile(exact, 50) / np.percentile(searches['built'], 50):.1f}x")


if __name__ == "__main__":
    main()
