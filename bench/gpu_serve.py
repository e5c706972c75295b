"""The serving path on a GPU: the ``serve`` stage of bench/gpu_run.py, so one run measures it whenever a GPU is at
hand (``--dry``: the same code, tiny, on the CPU).

1. onnxruntime alone on pre-decoded arrays: a ResNet-18 bundle (imagenet100's backbone at 224 px, random init:
   the cost of a trained one) in fp32 and fp16, at batch 1 to 64, on the providers the service would pick
   (CUDA when present);
2. the service (`bentoml serve`, the same bundles): img/s with 1 and with 8 Imagewoof photos per request from
   many closed-loop clients, beside raw inference at the batch those clients can form, and the stage breakdown;
3. extraction of the Imagewoof photos against raw inference at its batch: decoding in parallel threads must keep
   the GPU fed (goal >= 0.9).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bundles import random_bundle
from bench.launcher import Server
from bench.loadgen import image_shots, percentile, run_load
from bench.serve_load import stage_line, stage_sums
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.extract.extract import extract

log = logging.getLogger("gpu_run")


def batch_rates(embedder: Embedder, pixels: np.ndarray, sizes: list[int], seconds: float) -> dict[str, float]:
    """Median images/s of ``embed_arrays`` per batch size, after a warm-up call of each size."""
    rates = {}
    for size in sizes:
        batch = pixels[np.arange(size) % len(pixels)]
        embedder.embed_arrays(batch)
        times, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            embedder.embed_arrays(batch)
            times.append(time.perf_counter() - t0)
        rates[str(size)] = round(size / statistics.median(times), 1)
    return rates


def service_rates(bundle: Path, photos: list[bytes], clients: int, seconds: float, work: Path) -> dict[str, Any]:
    """The service's img/s at 1 and 8 photos per request, with latency and the stage breakdown."""
    env = {**os.environ, "CORINFOMAX_MODEL": str(bundle), "CORINFOMAX_DEMO_DIR": "",
           "CORINFOMAX_INDEX": str(work / "index"), "BENTOML_HOME": str(work / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "CORINFOMAX_ACCESS_LOG": "0"}
    server = Server(env, work / "server.log").start(timeout=300)
    out: dict[str, Any] = {}
    try:
        run_load(server.url, image_shots("/embed", photos, 8), clients, 3)  # warm-up: sessions, CUDA kernels
        for per_request in (1, 8):
            before = stage_sums(server.url, "embed")
            result = run_load(server.url, image_shots("/embed", photos, per_request), clients, seconds)
            out[f"{per_request}_per_request"] = {
                "img_s": round(result.images / result.seconds, 1), "p50_ms": round(percentile(result.ok(), 50), 1),
                "p99_ms": round(percentile(result.ok(), 99), 1), "errors": len(result.errors),
                "stages": stage_line(before, stage_sums(server.url, "embed"), len(result.ok()))}
    finally:
        server.stop()
    return out


def extract_ratio(bundle: Path, folder: Path, pixels: np.ndarray, work: Path) -> dict[str, float]:
    """Extraction of ``folder`` against raw inference of its pixels, both at batch 256."""
    embedder = Embedder(bundle)
    embedder.embed_arrays(pixels[:256], 256)
    started = time.perf_counter()
    embedder.embed_arrays(pixels, 256)
    raw = len(pixels) / (time.perf_counter() - started)
    summary = extract([str(folder)], bundle, work / "features", batch_size=256, show_progress=False)
    rate = summary["images"] / summary["seconds"]
    return {"raw_img_s": round(raw, 1), "extract_img_s": round(rate, 1), "ratio": round(rate / raw, 3)}


def serve_stage(photos_dir: Path, dry: bool) -> dict[str, Any]:
    """Every measurement of the module's docstring, for fp32 and fp16 (the dry run: tiny, fp32 only)."""
    preset, precisions = ("cpu", ["fp32"]) if dry else ("imagenet100", ["fp32", "fp16"])
    sizes = [1, 4] if dry else [1, 8, 16, 32, 64]
    seconds, clients = (1.0, 4) if dry else (15.0, 32)
    paths = sorted(p for p in photos_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[: 64 if dry else 4000]
    photos = [p.read_bytes() for p in paths[:256]]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_serve.") as tmp:
        for precision in precisions:
            work = Path(tmp) / precision
            bundle = random_bundle(preset, work / "bundle", precision=precision)
            embedder = Embedder(bundle)
            pixels = np.stack([embedder.preprocess(p.read_bytes()) for p in paths])
            log.info("serve %s: onnxruntime on %s", precision, embedder.providers[0])
            report[precision] = {"providers": embedder.providers,
                                 "onnxruntime_img_s": batch_rates(embedder, pixels, sizes, seconds / 2)}
            report[precision]["service"] = service_rates(bundle, photos, clients, seconds, work)
            report[precision]["extract"] = extract_ratio(bundle, _subset(paths, work / "subset"), pixels, work)
            log.info("serve %s -> %s", precision, report[precision])
    return report


def _subset(paths: list[Path], dest: Path) -> Path:
    """A folder of links to ``paths``: extraction reads exactly the files raw inference was given."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        (dest / f"{i:05d}{path.suffix}").symlink_to(path.resolve())
    return dest
