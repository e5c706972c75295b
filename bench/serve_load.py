"""Closed-loop HTTP load on `bentoml serve` against raw in-process onnxruntime, in one run.

    python -m bench.serve_load --bundle models/default --images ../shared/datasets/cifar10/test \
        --clients 8 --seconds 20 --workers 1 [--per-request 1 8]

Fairness of the comparison:
- raw side: the same JPEGs, decoded and preprocessed once (so raw pays no decode), embedded with
  ``Embedder.embed_arrays`` with the service's intra-op threads, at the batch a closed loop of N clients can
  form at most (``min(clients x images per request, max batch)``) and at batch 1; measured before and after
  the service runs and averaged, so drifting background load hits both sides alike;
- service side: N concurrent clients, each request one or more JPEGs (decode happens server side), one run per
  ``--per-request`` value;
- the load generator (``bench.loadgen``) is a separate process speaking HTTP/1.1 over asyncio streams with
  requests encoded in advance, so it takes as little of the shared cores as possible; its CPU is printed.
Prints per request size: throughput ratio (goals: >= 0.6 at 1 image per request, >= 0.9 at 8), p50/p99
latency, server CPU, and the mean time of each stage per request (from the service's own
``corinfomax_stage_seconds`` metrics); then single-image latency against raw batch-1 (goal: within 2 ms).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.launcher import Server
from bench.loadgen import LoadResult, image_shots, percentile, run_load
from corinfomax.serving.api.config import model_threads
from corinfomax.serving.api.metrics import STAGES
from corinfomax.serving.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]
GOALS = {1: 0.6, 8: 0.9}


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


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (the server's workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def stage_sums(url: str, endpoint: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each stage of ``endpoint`` in the service's /metrics, over all workers."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, tuple[float, float]] = {}
    for kind in ("sum", "count"):
        pattern = rf'^corinfomax_stage_seconds_{kind}{{([^}}]*)}} (\S+)$'
        for labels, value in re.findall(pattern, text, re.M):
            if f'endpoint="{endpoint}"' in labels and (stage := re.search(r'stage="(\w+)"', labels)):
                total, count = out.get(stage.group(1), (0.0, 0.0))
                out[stage.group(1)] = (total + float(value), count) if kind == "sum" else (total, count + float(value))
    return out


def stage_line(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], requests: int) -> str:
    """Mean ms per request of each stage between two ``stage_sums``."""
    parts = [f"{stage} {(after.get(stage, (0, 0))[0] - before.get(stage, (0, 0))[0]) / max(1, requests) * 1000:.2f}"
             for stage in STAGES]
    return "stages, ms per request: " + ", ".join(parts)


def service_run(server: Server, jpegs: list[bytes], per_request: int, clients: int, seconds: float) -> dict:
    """One timed run of ``clients`` clients sending ``per_request`` JPEGs per /embed request."""
    shots = image_shots("/embed", jpegs, per_request)
    assert server.proc is not None  # started
    stages_before, cpu_before = stage_sums(server.url, "embed"), tree_cpu_seconds(server.proc.pid)
    result = run_load(server.url, shots, clients, seconds)
    cpu = tree_cpu_seconds(server.proc.pid) - cpu_before
    requests = len(result.ok())
    return {"result": result, "cpu_s": cpu, "stages": stage_line(stages_before, stage_sums(server.url, "embed"),
                                                                 requests)}


def report(per_request: int, raw_rate: float, batch: int, run: dict) -> None:
    result: LoadResult = run["result"]
    lat, requests = result.ok(), max(1, len(result.ok()))
    rate = result.images / result.seconds
    print(f"{per_request} image(s) per request: service {rate:8.1f} img/s, raw batch {batch} {raw_rate:8.1f} img/s, "
          f"ratio {rate / raw_rate:.3f} (goal >= {GOALS.get(per_request, 0.9)})")
    per_image = run["cpu_s"] / max(1, result.images) * 1000
    print(f"  p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, errors {len(result.errors)}, "
          f"server CPU {run['cpu_s'] / requests * 1000:.2f} ms/request ({per_image:.2f} ms/image), "
          f"load generator CPU {result.cpu_s / requests * 1000:.2f} ms/request")
    print(f"  {run['stages']}")
    if result.errors:
        print(f"  first error: {result.errors[0]}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--count", type=int, default=256, help="distinct JPEGs to cycle through")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 8], help="images per request, one run each")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per worker, for the service and raw alike (0: the service's default)")
    parser.add_argument("--max-batch", type=int, default=64, help="the service's CORINFOMAX_BATCH_SIZE")
    parser.add_argument("--checkout", type=Path, default=None,
                        help="serve another checkout's code (a `git archive` of an earlier commit): before/after")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server, e.g. CORINFOMAX_ACCESS_LOG=0 (repeatable)")
    args = parser.parse_args()

    every = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    jpegs = [p.read_bytes() for p in every[:: max(1, len(every) // args.count)][: args.count]]
    threads = args.threads or model_threads(args.workers)
    embedder = Embedder(args.bundle, threads=threads)
    pixels = np.stack([embedder.preprocess(j) for j in jpegs])
    batches = {n: min(args.clients * n, args.max_batch) for n in args.per_request}
    raw_time = max(2.0, args.seconds / 4)
    embedder.embed_arrays(pixels[: max(batches.values())])  # warm-up
    raw = {n: [raw_run(embedder, pixels, batches[n], raw_time)[0]] for n in args.per_request}
    raw_single = raw_run(embedder, pixels[:64], 1, raw_time / 2)[1]

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_DEMO_DIR": "",
               "CORINFOMAX_INDEX": f"{tmp}/index", "CORINFOMAX_WORKERS": str(args.workers),
               "CORINFOMAX_THREADS": str(threads), "CORINFOMAX_BATCH_SIZE": str(args.max_batch),
               "BENTOML_HOME": f"{tmp}/bentoml", "BENTOML_DO_NOT_TRACK": "True",
               **dict(kv.split("=", 1) for kv in args.env),
               **({"PYTHONPATH": str(args.checkout.resolve())} if args.checkout else {})}
        server = Server(env, Path(tmp) / "server.log", cwd=args.checkout).start()
        try:
            run_load(server.url, image_shots("/embed", jpegs, args.max_batch), args.workers * 2, 3)  # warm-up
            runs = {n: service_run(server, jpegs, n, args.clients, args.seconds) for n in args.per_request}
            single = run_load(server.url, image_shots("/embed", jpegs, 1), 1, raw_time)
        finally:
            server.stop()

    for n in args.per_request:
        raw[n].append(raw_run(embedder, pixels, batches[n], raw_time)[0])
    raw_single += raw_run(embedder, pixels[:64], 1, raw_time / 2)[1]
    print(f"workers {args.workers}, intra-op threads {threads}, clients {args.clients}, {len(jpegs)} JPEGs, "
          f"server env {args.env}, {args.seconds:.0f}s per run, load average {os.getloadavg()[0]:.1f}")
    for n in args.per_request:
        report(n, statistics.mean(raw[n]), batches[n], runs[n])
        print(f"  raw before {raw[n][0]:.1f}, after {raw[n][1]:.1f} img/s (decoded images, no HTTP)")
    raw_p50, svc_p50 = statistics.median(raw_single), percentile(single.ok(), 50)
    print(f"single image: service p50 {svc_p50:.2f} ms (p99 {percentile(single.ok(), 99):.2f}) vs raw batch-1 p50 "
          f"{raw_p50:.2f} ms: +{svc_p50 - raw_p50:.2f} ms (goal <= 2 ms)")


if __name__ == "__main__":
    main()
