"""Backpressure under overload: 64 closed-loop clients against the service with its admission gate and without,
side by side in one run.

    python -m bench.serve_backpressure [--clients 64 --per-request 16 --seconds 30 --max-queue-ms 500]
    python -m bench.serve_backpressure --sweep 1,2,4,8,16,32 --per-request 1   # throughput and latency by clients

With the gate (``CORINFOMAX_MAX_QUEUE_MS``): accepted requests' p99 should stay within the bound, refusals
(503 + Retry-After) come within 50 ms, no request times out, the server's memory stays flat. Without it
(``CORINFOMAX_MAX_QUEUE_MS=0``): every request waits behind the whole crowd. The offered load is printed as a
multiple of what the service holds within the bound (its throughput x the bound, in requests): ~3x is the
issue's case. ``--sweep`` runs without the gate at each client count, which is how the default bound was
chosen (docs/LIMITS.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path

from bench.launcher import Server
from bench.loadgen import LoadResult, image_shots, percentile, run_load
from bench.serve_profile import workers
from corinfomax.serving.api.config import DEFAULT_MAX_QUEUE_MS

REPO = Path(__file__).resolve().parents[1]


def rss_mib(server: Server) -> float:
    return sum(proc.memory_info().rss for proc in workers(server).values()) / (1 << 20)


def crowd_run(server: Server, jpegs: list[bytes], args: argparse.Namespace,
              polite: bool) -> tuple[LoadResult, list[float]]:
    """The crowd's run, with the workers' RSS sampled every 2 s while it lasts."""
    samples: list[float] = [rss_mib(server)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(2.0):
            samples.append(rss_mib(server))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run_load(server.url, image_shots("/embed", jpegs, args.per_request), args.clients, args.seconds,
                          timeout=args.timeout, polite=polite)
    finally:
        done.set()
        sampler.join()
    return result, samples + [rss_mib(server)]


def serve(tmp: Path, args: argparse.Namespace, max_queue_ms: int) -> Server:
    env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_DEMO_DIR": "",
           "CORINFOMAX_INDEX": str(tmp / f"index{max_queue_ms}"), "BENTOML_HOME": str(tmp / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "CORINFOMAX_MAX_QUEUE_MS": str(max_queue_ms),
           "CORINFOMAX_WORKERS": str(args.workers)}
    return Server(env, tmp / f"server{max_queue_ms}.log").start()


def report(name: str, result: LoadResult, rss: list[float], bound_ms: float, clients: int, capacity: float) -> None:
    """One run's figures; ``capacity``: requests/s the service answered without the gate (what it can do)."""
    accepted, refused = result.ok(), result.with_status(503)
    rate = len(accepted) / result.seconds
    holds = capacity * bound_ms / 1000
    retry = sorted({value for value in result.retry_after if value is not None})
    print(f"{name}: {rate:.1f} requests/s accepted ({result.images / result.seconds:.0f} img/s), "
          f"accepted p50 {percentile(accepted, 50):.0f} ms p99 {percentile(accepted, 99):.0f} ms, "
          f"refused {len(refused)} (p50 {percentile(refused, 50):.1f} ms, p99 {percentile(refused, 99):.1f} ms, "
          f"Retry-After {retry}), timeouts and other errors {len(result.errors)}")
    print(f"  server RSS every 2 s (MiB): {', '.join(f'{m:.0f}' for m in rss)} ({rss[-1] - rss[0]:+.1f})")
    if bound_ms:  # the offered load against what the service holds: its throughput without the gate x the bound
        within = "within" if percentile(accepted, 99) <= bound_ms else "OVER"
        fast = "within" if percentile(refused, 99) <= 50 else "OVER"
        print(f"  {clients} clients = {clients / holds:.1f} x what the service holds within {bound_ms:.0f} ms "
              f"({holds:.1f} requests); accepted p99 {within} the bound; refusals' p99 {fast} 50 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--timeout", type=float, default=30, help="a client's timeout: a request past it failed")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-queue-ms", type=int, default=None, help="the bound (default: the service's)")
    parser.add_argument("--sweep", default=None, help="client counts to run without the gate, e.g. 1,2,4,8,16,32")
    args = parser.parse_args()
    bound = args.max_queue_ms or DEFAULT_MAX_QUEUE_MS
    jpegs = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:256]]
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            sweep(Path(tmp), jpegs, args)
            return
        results = {}
        runs = (("without the gate", 0, False), ("with the gate, clients waiting Retry-After", bound, True),
                ("with the gate, clients retrying at once", bound, False))
        for name, max_queue_ms, polite in runs:
            server = serve(Path(tmp), args, max_queue_ms)
            try:
                run_load(server.url, image_shots("/embed", jpegs, args.per_request), 2, 3)  # warm-up
                results[name] = (*crowd_run(server, jpegs, args, polite), max_queue_ms)
            finally:
                server.stop()
    print(f"{args.clients} clients, {args.per_request} images per request, {args.seconds:.0f} s each, bound "
          f"{bound} ms, load average {os.getloadavg()[0]:.1f}")
    free, _, _ = results["without the gate"]
    capacity = len(free.ok()) / free.seconds
    for name, (result, rss, max_queue_ms) in results.items():
        report(name, result, rss, max_queue_ms, args.clients, capacity)


def sweep(tmp: Path, jpegs: list[bytes], args: argparse.Namespace) -> None:
    """Throughput and latency by number of clients, without the gate: where more clients stop adding throughput."""
    server = serve(tmp, args, 0)
    try:
        shots = image_shots("/embed", jpegs, args.per_request)
        run_load(server.url, shots, 2, 3)  # warm-up
        print(f"{args.per_request} images per request, no gate, load average {os.getloadavg()[0]:.1f}")
        for clients in (int(c) for c in args.sweep.split(",")):
            result = run_load(server.url, shots, clients, args.seconds)
            print(f"  {clients:3d} clients: {len(result.ok()) / result.seconds:7.1f} requests/s, "
                  f"{result.images / result.seconds:7.0f} img/s, p50 {percentile(result.ok(), 50):6.1f} ms, "
                  f"p99 {percentile(result.ok(), 99):6.1f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
