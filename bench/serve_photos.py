"""Big photos through the service against decode + inference of the same files in one process, side by side.

    python -m bench.serve_photos [--bundle BUNDLE | --preset photo] [--photos 32 --per-request 8 --clients 2]

A real-resolution bundle (``--bundle``, or one exported here from a random-init backbone of ``--preset``:
``photo`` is tiny_resnet at 128 px, ``imagenet100`` ResNet-18 at 224) and Imagewoof photos upscaled to 3000 px
(JPEG q90, made in a temporary folder). The in-process side decodes (reduced-size, as the service does) and
embeds requests' worth of photos in one thread per core with onnxruntime on one thread per call: what this
machine does with the files and no HTTP; measured before and after the service and averaged. The service
side: ``--clients`` closed-loop clients sending ``--per-request`` photos per /embed. Prints the ratio (goal
>= 0.8), and how many cores the service keeps busy for one client's requests of 8 photos (decoding across
cores: up to the core count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.bundles import big_photos, random_bundle
from bench.launcher import Server
from bench.loadgen import image_shots, percentile, run_load
from bench.serve_load import tree_cpu_seconds
from corinfomax.core.images import model_input
from corinfomax.serving.embedder import Embedder


def in_process(embedder: Embedder, photos: list[bytes], per_request: int, seconds: float) -> float:
    """Images/s decoding and embedding groups of ``per_request`` photos, one group per thread, a thread per core."""
    groups = [photos[i : i + per_request] for i in range(0, len(photos), per_request)]

    def work(group: list[bytes]) -> int:
        embedder.embed_arrays(np.stack([model_input(p, embedder.resize)[0] for p in group]))
        return len(group)

    done, started = 0, time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        while time.perf_counter() - started < seconds:
            done += sum(pool.map(work, groups))
    return done / (time.perf_counter() - started)


def cpu_per_image(embedder: Embedder, photos: list[bytes]) -> tuple[float, float]:
    """Decode and inference CPU ms per photo, each on one thread."""
    started = time.process_time()
    pixels = np.stack([model_input(p, embedder.resize)[0] for p in photos])
    decode = (time.process_time() - started) / len(photos)
    started = time.process_time()
    embedder.embed_arrays(pixels)
    return decode * 1000, (time.process_time() - started) / len(photos) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--preset", default="photo", help="random-init bundle of this preset when no --bundle")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(args.preset, Path(tmp) / "bundle")
        photos = big_photos(args.photos, args.side)
        embedder = Embedder(bundle, threads=1)
        decode_ms, infer_ms = cpu_per_image(embedder, photos)
        local = [in_process(embedder, photos, args.per_request, args.seconds / 2)]
        env = {**os.environ, "CORINFOMAX_MODEL": str(bundle), "CORINFOMAX_DEMO_DIR": "",
               "CORINFOMAX_INDEX": f"{tmp}/index", "BENTOML_HOME": f"{tmp}/bentoml", "BENTOML_DO_NOT_TRACK": "True",
               **dict(kv.split("=", 1) for kv in args.env)}
        server = Server(env, Path(tmp) / "server.log").start()
        try:
            shots = image_shots("/embed", photos, args.per_request)
            run_load(server.url, shots, args.clients, 3)  # warm-up
            assert server.proc is not None
            cpu, started = tree_cpu_seconds(server.proc.pid), time.perf_counter()
            alone = run_load(server.url, shots, 1, args.seconds / 2)
            cores_busy = (tree_cpu_seconds(server.proc.pid) - cpu) / (time.perf_counter() - started)
            busy = run_load(server.url, shots, args.clients, args.seconds)
        finally:
            server.stop()
        local.append(in_process(embedder, photos, args.per_request, args.seconds / 2))

    rate, best = busy.images / busy.seconds, statistics.mean(local)
    print(f"{embedder.card.tag}, input {embedder.input_size}, {len(photos)} photos of {args.side} px, "
          f"{args.per_request} per request, {args.clients} clients, load average {os.getloadavg()[0]:.1f}")
    print(f"one thread: decode {decode_ms:.1f} ms, inference {infer_ms:.1f} ms CPU per photo")
    print(f"in one process ({os.cpu_count()} threads): {best:.1f} img/s (before {local[0]:.1f}, after {local[1]:.1f})")
    print(f"service: {rate:.1f} img/s, p50 {percentile(busy.ok(), 50):.0f} ms, p99 {percentile(busy.ok(), 99):.0f} ms "
          f"per request, errors {len(busy.errors)}; ratio {rate / best:.3f} (goal >= 0.8)")
    print(f"one client: {alone.images / alone.seconds:.1f} img/s, p50 {percentile(alone.ok(), 50):.0f} ms per "
          f"request, the service kept {cores_busy:.2f} of {os.cpu_count()} cores busy")


if __name__ == "__main__":
    main()
