"""Mixed load on a real `bentoml serve`: 16 clients doing embed/search/classify/add/delete/get for 60 s.

    python -m bench.hostile_load --clients 16 --seconds 60

Checks what a careful client relies on, and prints the numbers of docs/RESULTS.md "Mixed load":
- every valid request answers 200 (errors are counted and the first few printed);
- every acknowledged add is present exactly once at the end (looked up by its ids and its metadata
  tag) and every acknowledged delete is gone; the index count equals start + added - deleted;
- the memory of each server process (RSS every 10 s) and its growth beside the data it stored meanwhile.
Adds carry an idempotency key, as a client that retries should send. The load generator is one asyncio
loop in this process; the server runs the default model with its demo collection (labelled, for kNN).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench.launcher import Server

REPO = Path(__file__).resolve().parents[1]
# Share of each operation in the mix (reads dominate, as in a search service).
MIX = {"embed": 0.2, "search_image": 0.15, "search_vector": 0.15, "classify": 0.15, "add": 0.2, "delete": 0.1,
       "get": 0.05}


def process_name(proc: psutil.Process) -> str:
    """``IndexOwner#1``, ``CorInfoMax#2`` for BentoML's workers (from their command line), else ``arbiter``."""
    args = proc.cmdline()
    if "--service-name" not in args:
        return "arbiter"
    return f"{args[args.index('--service-name') + 1]}#{args[args.index('--worker-id') + 1]}"


def rss_by_process(server: Server) -> dict[str, int]:
    """RSS in bytes of the server (arbiter) and each of its workers, by ``process_name``."""
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[process_name(proc)] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return dict(sorted(out.items()))


class Client:
    """One closed-loop client: its own adds (so its deletes never race another client's)."""

    def __init__(self, number: int, http: httpx.AsyncClient, jpegs: list[bytes], dim: int, seed: int) -> None:
        self.number, self.http, self.jpegs, self.dim = number, http, jpegs, dim
        self.rng = random.Random(seed)
        self.live: dict[int, str] = {}  # id -> tag of items this client added and has not deleted
        self.deleted: list[int] = []
        self.latencies: dict[str, list[float]] = {op: [] for op in MIX}
        self.errors: list[str] = []
        self.sequence = 0

    def _image(self) -> tuple[str, tuple[str, bytes, str]]:
        return ("images", ("x.jpg", self.rng.choice(self.jpegs), "image/jpeg"))

    def _vector(self) -> list[float]:
        return [self.rng.gauss(0, 1) for _ in range(self.dim)]

    async def step(self) -> None:
        op = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if op in ("delete", "get") and not self.live:
            op = "add"
        started = time.perf_counter()
        if op == "embed":
            resp = await self.http.post("/embed", files=[self._image()])
        elif op == "search_image":
            resp = await self.http.post("/search", files=[self._image()], data={"k": "5"})
        elif op == "search_vector":
            resp = await self.http.post("/search", json={"vectors": [self._vector()], "k": 10})
        elif op == "classify":
            method = self.rng.choice(["probe", "knn"])
            resp = await self.http.post("/classify", files=[self._image()], data={"k": "3", "method": method})
        elif op == "add":
            self.sequence += 1
            tag = f"{self.number}-{self.sequence}"
            resp = await self.http.post("/add", json={"vectors": [self._vector()], "metadata": [{"tag": tag}],
                                                      "idempotency_key": uuid.uuid4().hex})
            if resp.status_code == 200:
                self.live[resp.json()["ids"][0]] = tag
        elif op == "delete":
            victim = self.rng.choice(list(self.live))
            resp = await self.http.post("/delete", json={"ids": [victim], "idempotency_key": uuid.uuid4().hex})
            if resp.status_code == 200:
                del self.live[victim]
                self.deleted.append(victim)
        else:
            resp = await self.http.post("/get", json={"id": self.rng.choice(list(self.live))})
        self.latencies[op].append((time.perf_counter() - started) * 1000)
        if resp.status_code != 200:
            self.errors.append(f"{op}: HTTP {resp.status_code} {resp.text[:200]}")


async def run_load(url: str, jpegs: list[bytes], dim: int, clients: int, seconds: float,
                   on_tick: Any = None) -> list[Client]:
    """Run the clients for ``seconds``; call ``on_tick()`` every 10 s meanwhile (e.g. to sample RSS)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        workers = [Client(c, http, jpegs, dim, seed=c) for c in range(clients)]
        deadline = time.monotonic() + seconds

        async def loop(client: Client) -> None:
            while time.monotonic() < deadline:
                await client.step()

        async def ticker() -> None:
            while on_tick is not None and time.monotonic() < deadline - 5:
                await asyncio.sleep(10)
                on_tick()

        await asyncio.gather(ticker(), *(loop(c) for c in workers))
    return workers


async def fill_bounded_caches(url: str, jpegs: list[bytes], workers: int) -> None:
    """Bring the server's bounded caches to their bound, so that growth measured afterwards is the stored data's.

    Each API worker's onnxruntime arena is sized by the largest batch it has run (at most ``max_images`` rows:
    bigger merged batches are cut there): a few requests of that many images per worker, concurrently,
    since the workers share the port. ``IndexOwner``'s SQLite page cache (2 MiB, serving/index/store_sqlite.py) fills
    as rows are read: one search whose answer is every stored item reads them all.
    """
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        info = (await http.post("/info", json={})).json()
        most = info["limits"]["max_images"]
        files = [("images", (f"{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg")) for i in range(most)]
        answers = await asyncio.gather(*(http.post("/embed", files=files) for _ in range(4 * workers)))
        stats = (await http.post("/stats", json={})).json()
        vector = [1.0] + [0.0] * (stats["dim"] - 1)
        queries = max(1, info["limits"]["max_hits"] // info["limits"]["max_k"])
        answers.append(await http.post("/search", json={"vectors": [vector] * queries, "k": info["limits"]["max_k"]}))
    for answer in answers:
        answer.raise_for_status()


def verify(http: httpx.Client, workers: list[Client], count_before: int) -> list[str]:
    """Every acknowledged add present once with its tag, every acknowledged delete gone, counts add up."""
    problems = []
    live = {i: tag for w in workers for i, tag in w.live.items()}
    for item_id, tag in live.items():
        resp = http.post("/get", json={"id": item_id})
        if resp.status_code != 200 or resp.json()["metadata"].get("tag") != tag:
            problems.append(f"acknowledged add {item_id} ({tag}): {resp.status_code} {resp.text[:100]}")
    for item_id in (i for w in workers for i in w.deleted):
        if http.post("/get", json={"id": item_id}).status_code != 404:
            problems.append(f"acknowledged delete {item_id} still present")
    added = sum(len(w.live) + len(w.deleted) for w in workers)
    deleted = sum(len(w.deleted) for w in workers)
    count = http.post("/stats", json={}).json()["count"]
    if count != count_before + added - deleted:
        problems.append(f"index count {count} != {count_before} + {added} added - {deleted} deleted (duplicates?)")
    tags = Counter(tag for tag in live.values())
    problems += [f"tag {tag} stored {n} times" for tag, n in tags.items() if n > 1]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    jpegs = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[::50][:200]]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_INDEX": f"{tmp}/index",
               "CORINFOMAX_WORKERS": str(args.workers), "CORINFOMAX_ACCESS_LOG": "0",
               "BENTOML_HOME": f"{tmp}/bentoml", "BENTOML_DO_NOT_TRACK": "True"}
        server = Server(env, Path(tmp) / "server.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                stats = http.post("/stats", json={}).json()
                asyncio.run(run_load(server.url, jpegs, stats["dim"], args.clients, 10))  # warm-up: pools, schemas
                asyncio.run(fill_bounded_caches(server.url, jpegs, args.workers))
                count_before = http.post("/stats", json={}).json()["count"]
                samples = [rss_by_process(server)]
                started = time.perf_counter()
                workers = asyncio.run(run_load(server.url, jpegs, stats["dim"], args.clients, args.seconds,
                                               on_tick=lambda: samples.append(rss_by_process(server))))
                elapsed = time.perf_counter() - started
                samples.append(rss_by_process(server))
                problems = verify(http, workers, count_before)
                count_after = http.post("/stats", json={}).json()["count"]
            db_bytes = sum(f.stat().st_size for f in Path(tmp, "index").iterdir())
            # Dropped internal connections the service retried (serving/api/envelope.py `call` logs each one).
            retries = (Path(tmp) / "server.log").read_text(errors="replace").count("retrying ")
        finally:
            server.stop()

    every = [ms for w in workers for lat in w.latencies.values() for ms in lat]
    errors = [e for w in workers for e in w.errors]
    print(f"{args.clients} clients, {args.seconds:.0f}s, {args.workers} workers, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"all requests: {len(every) / elapsed:.1f} req/s, p50 {np.percentile(every, 50):.1f} ms, "
          f"p99 {np.percentile(every, 99):.1f} ms, errors {len(errors)}")
    for op in MIX:
        lat = [ms for w in workers for ms in w.latencies[op]]
        if lat:
            print(f"  {op:14s} {len(lat):6d} requests  p50 {np.percentile(lat, 50):7.1f} ms  "
                  f"p99 {np.percentile(lat, 99):7.1f} ms")
    for error in errors[:5]:
        print(f"  error: {error}")
    print(f"writes: {sum(len(w.live) + len(w.deleted) for w in workers)} adds and "
          f"{sum(len(w.deleted) for w in workers)} deletes acknowledged; index {count_before} -> {count_after} items; "
          f"check: {'every acknowledged write present once' if not problems else f'{len(problems)} problems'}")
    print(f"internal calls to IndexOwner retried after a dropped connection: {retries}")
    for problem in problems[:5]:
        print(f"  problem: {problem}")
    report_memory(samples, count_after - count_before, stats["dim"], len(every), db_bytes)


def report_memory(samples: list[dict[str, int]], net_items: int, dim: int, requests: int, db_bytes: int) -> None:
    """RSS of each process every 10 s, its growth, and the growth the stored data explains.

    Only ``IndexOwner`` stores anything in memory: the FAISS copy of each net added vector (``dim`` float32).
    The API workers and the arbiter store nothing, so any growth of theirs is unexplained; so is
    ``IndexOwner``'s beyond its vectors.
    """
    stored = net_items * dim * 4
    first, last = samples[0], samples[-1]
    unexplained = 0
    for name in first:
        series = [s[name] for s in samples if name in s]
        grown = series[-1] - series[0]
        explained = stored if name.startswith("IndexOwner") else 0
        unexplained += grown - explained
        print(f"  {name:14s} RSS every 10 s " + " ".join(f"{r / 2**20:.0f}" for r in series)
              + f" MiB: {grown / 2**20:+.1f} MiB ({grown / max(requests, 1):+.0f} B per request), stored data "
              f"{explained / 2**20:.1f} MiB")
    total_before, total_after = sum(first.values()), sum(last.values())
    print(f"server RSS {total_before / 2**20:.0f} -> {total_after / 2**20:.0f} MiB "
          f"({(total_after - total_before) / 2**20:+.1f} MiB); net {net_items} items stored = {stored / 2**20:.2f} MiB "
          f"of vectors; unexplained {unexplained / 2**20:+.1f} MiB ({unexplained / max(requests, 1):+.0f} B per "
          f"request); index folder {db_bytes / 2**20:.1f} MiB")

if __name__ == "__main__":
    main()
