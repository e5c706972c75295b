"""Closed-loop HTTP load on `bentoml serve` against raw in-process onnxruntime, in one run.

    python -m bench.serve_load --bundle models/default --images ../shared/datasets/cifar10/test \
        --clients 8 --seconds 20 --workers 1

Fairness of the comparison:
- raw side: the same JPEGs, decoded and preprocessed once (so raw pays no decode), embedded with
  ``Embedder.embed_arrays`` with the service's intra-op threads, at the batch a closed loop of N
  clients can form at most (``min(clients, max batch)``) and at batch 1; measured before and after
  the service run and averaged, so drifting background load hits both sides alike;
- service side: one JPEG per request from N concurrent clients (decode happens server side);
- the load generator is a separate process with one asyncio loop (httpx.AsyncClient), not N Python threads,
  so it takes as little of the shared cores as possible; its CPU time is printed.
Prints throughput ratio (goal >= 0.85), p50/p99 latency, and single-image latency against raw
batch-1 (goal: within 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.launcher import Server
from corinfomax.serving.api.config import model_threads
from corinfomax.serving.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def raw_run(embedder: Embedder, pixels: np.ndarray, batch: int, seconds: float) -> tuple[float, list[float]]:
    """Images per second and per-call latencies (ms) of ``embed_arrays`` at a fixed batch size."""
    done, latencies, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(pixels), batch):
            t0 = time.perf_counter()
            embedder.embed_arrays(pixels[i : i + batch])
            latencies.append((time.perf_counter() - t0) * 1000)
            done += len(pixels[i : i + batch])
    return done / (time.perf_counter() - start), latencies


async def _load(url: str, jpegs: list[bytes], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client(http: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while loop.time() < deadline:
            t0 = time.perf_counter()
            resp = await http.post("/embed", files=[("images", ("x.jpg", jpegs[i % len(jpegs)], "image/jpeg"))])
            latencies.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                errors.append(f"HTTP {resp.status_code} {resp.text[:300]}")
            i += clients

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http, c) for c in range(clients)))
    return {"rate": len(latencies) / (time.perf_counter() - start), "latencies": latencies, "errors": errors}


def load(url: str, jpegs: list[bytes], clients: int, seconds: float) -> dict:
    """Run in a child process: N clients on one event loop; adds the process's CPU seconds."""
    result = asyncio.run(_load(url, jpegs, clients, seconds))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (the server's workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def load_in_child(url: str, jpegs: list[bytes], clients: int, seconds: float) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(load, (url, jpegs, clients, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--count", type=int, default=256, help="distinct JPEGs to cycle through")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per worker, for the service and raw alike (0: the service's default)")
    parser.add_argument("--max-batch", type=int, default=64, help="the service's CORINFOMAX_BATCH_SIZE")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server, e.g. CORINFOMAX_ACCESS_LOG=0 (repeatable)")
    args = parser.parse_args()

    every = sorted(args.images.rglob("*.jpg"))
    jpegs = [p.read_bytes() for p in every[:: max(1, len(every) // args.count)][: args.count]]
    threads = args.threads or model_threads(args.workers)
    batch = min(args.clients, args.max_batch)
    embedder = Embedder(args.bundle, threads=threads)
    pixels = np.stack([embedder.preprocess(j) for j in jpegs])
    raw_time = max(2.0, args.seconds / 4)
    embedder.embed_arrays(pixels[:batch])  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    raw_rates = [raw_run(embedder, pixels, batch, raw_time)[0]]
    raw_cpu = (time.process_time() - cpu0) / (raw_rates[0] * (time.perf_counter() - wall0))  # CPU s per image
    raw_single = raw_run(embedder, pixels[:64], 1, raw_time / 2)[1]

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_DEMO_DIR": "",
               "CORINFOMAX_INDEX": f"{tmp}/index", "CORINFOMAX_WORKERS": str(args.workers),
               "CORINFOMAX_THREADS": str(threads), "CORINFOMAX_BATCH_SIZE": str(args.max_batch),
               "BENTOML_HOME": f"{tmp}/bentoml", "BENTOML_DO_NOT_TRACK": "True",
               **dict(kv.split("=", 1) for kv in args.env)}
        server = Server(env, Path(tmp) / "server.log").start()
        try:
            load_in_child(server.url, jpegs[:16], args.clients, 3)  # warm-up: sessions, connections
            assert server.proc is not None  # started
            cpu_before = tree_cpu_seconds(server.proc.pid)
            busy = load_in_child(server.url, jpegs, args.clients, args.seconds)
            server_cpu = tree_cpu_seconds(server.proc.pid) - cpu_before
            single = load_in_child(server.url, jpegs, 1, raw_time)
        finally:
            server.stop()

    raw_rates.append(raw_run(embedder, pixels, batch, raw_time)[0])
    raw_single += raw_run(embedder, pixels[:64], 1, raw_time / 2)[1]
    raw_rate = statistics.mean(raw_rates)
    print(f"workers {args.workers}, intra-op threads {threads}, clients {args.clients}, {len(jpegs)} JPEGs, "
          f"server env {args.env}, "
          f"{args.seconds:.0f}s, load average {os.getloadavg()[0]:.1f}")
    print(f"raw onnxruntime batch {batch}: {raw_rate:8.1f} img/s (before {raw_rates[0]:.1f}, after {raw_rates[1]:.1f}; "
          "decoded images, no HTTP)")
    lat = busy["latencies"]
    print(f"service /embed:        {busy['rate']:8.1f} img/s  p50 {percentile(lat, 50):.1f} ms  "
          f"p99 {percentile(lat, 99):.1f} ms  errors {len(busy['errors'])}  "
          f"(load generator CPU {busy['cpu_s'] / max(1, len(lat)) * 1000:.2f} ms/request)")
    if busy["errors"]:
        print(f"first error: {busy['errors'][0]}", file=sys.stderr)
    print(f"CPU per image: service {server_cpu / max(1, len(lat)) * 1000:.2f} ms (all its processes), "
          f"raw model {raw_cpu * 1000:.2f} ms")
    print(f"throughput ratio service/raw: {busy['rate'] / raw_rate:.3f} (goal >= 0.85)")
    raw_p50, svc_p50 = statistics.median(raw_single), percentile(single["latencies"], 50)
    print(f"single image: service p50 {svc_p50:.1f} ms (p99 {percentile(single['latencies'], 99):.1f}) vs raw "
          f"batch-1 p50 {raw_p50:.2f} ms: +{svc_p50 - raw_p50:.1f} ms (goal <= 10 ms)")


if __name__ == "__main__":
    main()
