"""Re-embedding a live collection, measured side by side in one run:

1. throughput: the service's re-embed job (in the index service, one onnxruntime thread, reading the originals the
   collection kept), alone, against `corinfomax extract` of the same images with the same model and one thread
   (goal: >= 0.8);
2. search latency: p50/p99 of searches by image (one JPEG each, one client) while a second job re-embeds the
   collection back to its first model, against the same searches with the service idle (goal: p99 <= 2x idle).

    python -m bench.reembed [--model models/default] [--new-model BUNDLE] [--count 3000] [--index folder]

Without --new-model the job re-embeds with a copy of --model under another version (the same work). Figures from
a shared machine are noise: report them only from a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.launcher import Server
from corinfomax.core.bundle import CARD_FILE
from corinfomax.serving.extract.extract import extract

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "cifar10" / "test"


def pick(folder: Path, count: int) -> list[Path]:
    files = sorted(folder.rglob("*.jpg")) + sorted(folder.rglob("*.png"))
    if len(files) < count:
        raise SystemExit(f"{folder} has {len(files)} images, fewer than --count {count}")
    return files[:: max(1, len(files) // count)][:count]


def models_folder(root: Path, model: Path, new_model: Path | None) -> tuple[Path, str, str]:
    """A models folder with both bundles; their names as requests give them (name@version)."""
    folder = root / "models"
    shutil.copytree(model, folder / "a")
    if new_model is not None:
        shutil.copytree(new_model, folder / "b")
    else:  # the same weights under another version: the same work as a new model
        shutil.copytree(model, folder / "b")
        card = json.loads((folder / "b" / CARD_FILE).read_text())
        (folder / "b" / CARD_FILE).write_text(json.dumps({**card, "version": "bench-copy"}))
    keys = []
    for name in ("a", "b"):
        card = json.loads((folder / name / CARD_FILE).read_text())
        keys.append(f"{card['name']}@{card['version']}")
    return folder, keys[0], keys[1]


def extract_rate(files: list[Path], bundle: Path, work: Path) -> float:
    """Images per second of `corinfomax extract` (one onnxruntime thread) over ``files``."""
    listing = work / "files.txt"
    listing.write_text("".join(f"{path}\n" for path in files))
    started = time.perf_counter()
    extract([str(listing)], bundle, work / "features", threads=1, show_progress=False)
    return len(files) / (time.perf_counter() - started)


def searches(http: httpx.Client, files: list[Path], until: threading.Event | float) -> list[float]:
    """Latencies (s) of searches by image, one at a time, until the event is set or the deadline passes."""
    latencies = []
    i = 0
    while not (until.is_set() if isinstance(until, threading.Event) else time.monotonic() > until):
        path = files[i % len(files)]
        started = time.perf_counter()
        resp = http.post("/search", files=[("images", (path.name, path.read_bytes(), "image/jpeg"))],
                         data={"k": "10", "collection": '"bench"'})
        latencies.append(time.perf_counter() - started)
        if resp.status_code != 200:
            raise SystemExit(f"search failed: {resp.status_code} {resp.text[:300]}")
        i += 1
    return latencies


def reembed(http: httpx.Client, model: str,
            meanwhile: Callable[[threading.Event], None] | None) -> tuple[float, dict[str, Any]]:
    """Re-embed the collection with ``model`` (running ``meanwhile(done)`` in a thread); seconds it took, job."""
    done = threading.Event()
    helper = threading.Thread(target=meanwhile, args=(done,)) if meanwhile else None
    started = time.perf_counter()
    job = http.post("/reembed", json={"collection": "bench", "model": model}).json()["job"]
    if helper is not None:
        helper.start()
    while (state := http.post("/jobs", json={"job": job}).json())["state"] == "running":
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    done.set()
    if helper is not None:
        helper.join()
    if state["state"] != "done":
        raise SystemExit(f"the job failed: {state}")
    return seconds, state


def percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def run(args: argparse.Namespace, root: Path) -> dict[str, float]:
    files = pick(args.images, args.count)
    models, first, second = models_folder(root, args.model, args.new_model)
    rate_extract = extract_rate(files, models / "b", root)
    env = {**os.environ, "CORINFOMAX_INDEX": str(root / ("index" if args.index == "folder" else "index.db")),
           "CORINFOMAX_MODEL": str(models / "a"), "CORINFOMAX_MODELS": str(models), "CORINFOMAX_DEMO_DIR": "",
           "CORINFOMAX_ACCESS_LOG": "0", "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": str(REPO)}
    server = Server(env, root / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            http.post("/create_collection", json={"name": "bench", "model": first, "keep_originals": True})
            for start in range(0, len(files), 64):
                chunk = files[start : start + 64]
                http.post("/add", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk],
                          data={"collection": '"bench"'}).raise_for_status()
            seconds, _ = reembed(http, second, None)
            http.post("/drop_generation", json={"collection": "bench"}).raise_for_status()
            idle = searches(http, files, time.monotonic() + args.seconds)
            during: list[float] = []
            reembed(http, first, lambda done: during.extend(searches(http, files, done)))
    finally:
        server.stop()
    idle_p50, idle_p99 = percentiles(idle)
    during_p50, during_p99 = percentiles(during)
    return {"images": len(files), "extract_images_per_s": rate_extract, "reembed_items_per_s": len(files) / seconds,
            "throughput_ratio": len(files) / seconds / rate_extract, "idle_p50_ms": idle_p50,
            "idle_p99_ms": idle_p99, "during_p50_ms": during_p50, "during_p99_ms": during_p99,
            "p99_ratio": during_p99 / idle_p99, "searches_idle": len(idle), "searches_during": len(during)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default", help="the collection's model")
    parser.add_argument("--new-model", type=Path, default=None, help="the model to re-embed with")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image folder (default: CIFAR-10 test)")
    parser.add_argument("--count", type=int, default=3000, help="images in the collection")
    parser.add_argument("--seconds", type=float, default=15, help="idle searches for this long")
    parser.add_argument("--index", choices=("folder", "milvus-lite"), default="folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="reembed-bench-"))
    try:
        results = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{results['images']} images ({args.index} index)")
    print(f"  extract, 1 thread:         {results['extract_images_per_s']:8.1f} images/s")
    print(f"  re-embed job, 1 thread:    {results['reembed_items_per_s']:8.1f} items/s   "
          f"ratio {results['throughput_ratio']:.2f} (goal >= 0.8)")
    print(f"  search idle:        p50 {results['idle_p50_ms']:6.1f} ms  p99 {results['idle_p99_ms']:6.1f} ms  "
          f"({results['searches_idle']} searches)")
    print(f"  search during job:  p50 {results['during_p50_ms']:6.1f} ms  p99 {results['during_p99_ms']:6.1f} ms  "
          f"({results['searches_during']} searches)   p99 ratio {results['p99_ratio']:.2f} (goal <= 2)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
