"""Closed-loop HTTP load on `bentoml serve` against raw in-process onnxruntime, in one run.

    python bench/serve_load.py --bundle models/default --images ../shared/datasets/cifar10/test \
        --clients 8 --seconds 20 --workers 1

Raw baseline: the same JPEGs decoded and preprocessed once, embedded with ``Embedder.embed_arrays`` at
the service's batch size and at batch 1, with the same intra-op threads as one service worker. The
service is sent one JPEG per request by N concurrent clients (decode happens server side).
Prints throughput ratio (goal >= 0.85) and single-image latency against raw batch-1 (goal: +10 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.embedder import Embedder, cpu_threads_per_worker  # noqa: E402
from tests.test_service import Server  # noqa: E402  (the same launcher the tests use)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def raw_throughput(embedder: Embedder, pixels: np.ndarray, batch: int, seconds: float) -> tuple[float, list[float]]:
    done, latencies, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(pixels), batch):
            t0 = time.perf_counter()
            embedder.embed_arrays(pixels[i : i + batch])
            latencies.append((time.perf_counter() - t0) * 1000)
            done += len(pixels[i : i + batch])
    return done / (time.perf_counter() - start), latencies


def load(url: str, jpegs: list[bytes], clients: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = offset
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                resp = http.post("/embed", files=[("images", ("x.jpg", jpegs[i % len(jpegs)], "image/jpeg"))])
                latencies.append((time.perf_counter() - t0) * 1000)
                if resp.status_code != 200:
                    errors[0] += 1
                    if errors[0] == 1:
                        print(f"first error: HTTP {resp.status_code} {resp.text[:300]}", file=sys.stderr)
                i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - start), latencies, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--count", type=int, default=256, help="distinct JPEGs to cycle through")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="raw batch size (the service's max batch)")
    args = parser.parse_args()

    paths = sorted(args.images.rglob("*.jpg"))[:: max(1, len(list(args.images.rglob("*.jpg"))) // args.count)][: args.count]
    jpegs = [p.read_bytes() for p in paths]
    threads = cpu_threads_per_worker(args.workers)
    embedder = Embedder(args.bundle, threads=threads)
    pixels = np.stack([embedder.preprocess(j) for j in jpegs])
    raw_rate, _ = raw_throughput(embedder, pixels, args.batch, args.seconds / 2)
    _, raw_single = raw_throughput(embedder, pixels[:64], 1, min(5.0, args.seconds / 4))
    del embedder

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_DEMO_DIR": "", "CORINFOMAX_INDEX": f"{tmp}/index",
               "CORINFOMAX_WORKERS": str(args.workers), "BENTOML_HOME": f"{tmp}/bentoml",
               "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(REPO)}
        server = Server(env, Path(tmp) / "server.log").start()
        try:
            load(server.url, jpegs[:16], args.clients, 3)  # warm-up: sessions, batcher's latency model
            rate, latencies, errors = load(server.url, jpegs, args.clients, args.seconds)
            _, single, _ = load(server.url, jpegs, 1, min(5.0, args.seconds / 4))
        finally:
            server.stop()

    print(f"threads per worker {threads}, workers {args.workers}, clients {args.clients}, {len(jpegs)} JPEGs, "
          f"{args.seconds:.0f}s")
    print(f"raw onnxruntime batch {args.batch}: {raw_rate:8.1f} img/s (decoded images, no HTTP)")
    print(f"service /embed:         {rate:8.1f} img/s  p50 {percentile(latencies, 50):.1f} ms  "
          f"p99 {percentile(latencies, 99):.1f} ms  errors {errors}")
    print(f"throughput ratio service/raw: {rate / raw_rate:.3f} (goal >= 0.85)")
    raw_p50, svc_p50 = statistics.median(raw_single), statistics.median(single)
    print(f"single image: service p50 {svc_p50:.1f} ms vs raw batch-1 p50 {raw_p50:.2f} ms: "
          f"+{svc_p50 - raw_p50:.1f} ms (goal <= 10 ms)")


if __name__ == "__main__":
    main()
