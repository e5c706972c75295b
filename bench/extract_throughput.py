"""Throughput of `corinfomax extract` against the machine's limit and raw onnxruntime, side by side.

The limit is what the machine's cores can do at best when every image must be decoded and embedded:
cores / (decode CPU + inference CPU per image), both measured here on one thread (their cheapest), on the same
files. On a CPU the goal is >= 0.9 of that limit; with a GPU doing the inference, >= 0.9 of raw inference
(onnxruntime on pre-decoded arrays, ``--threads`` intra-op threads), i.e. decoding in parallel keeps it fed.
Everything runs in one process and run; rounds alternate to even out machine noise, the best of each counts.

    python bench/extract_throughput.py --model BUNDLE [--images ../shared/datasets/cifar10/test]
    python bench/extract_throughput.py --checkpoint runs/x/checkpoint.pt   # exports an fp32 bundle first
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from corinfomax.serving.embedder import Embedder
from corinfomax.serving.extract.extract import extract
from corinfomax.serving.extract.inputs import decode, list_inputs

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "test"


def cpu_budget(bundle: Path, items: list, batch_size: int) -> tuple[dict[str, float], np.ndarray]:
    """Decode and inference CPU per image, each on one thread, the limit they set on this machine's cores, and
    the decoded pixels."""
    embedder = Embedder(bundle, threads=1)
    started = time.process_time()
    decoded = [decode(item, embedder.resize)[0] for item in items]
    decode_s = (time.process_time() - started) / len(items)
    pixels = np.stack([array for array in decoded if array is not None])
    embedder.embed_arrays(pixels[:batch_size], batch_size)  # warm-up
    started = time.process_time()
    embedder.embed_arrays(pixels, batch_size)
    infer_s = (time.process_time() - started) / len(pixels)
    cores = os.cpu_count() or 1
    return {"decode_cpu_ms": round(decode_s * 1000, 4), "inference_cpu_ms": round(infer_s * 1000, 4),
            "limit_img_s": round(cores / (decode_s + infer_s), 1)}, pixels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model bundle folder")
    source.add_argument("--checkpoint", type=Path, help="checkpoint to export (fp32) into a temporary bundle")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image folder (default: CIFAR-10 test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="onnxruntime intra-op threads of raw inference (extract runs with its defaults)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="extract's workers (default: its own)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    try:
        bundle = args.model
        if bundle is None:
            from corinfomax.export.bundle import export_bundle

            bundle = work / "bundle"
            export_bundle(args.checkpoint, bundle, precision="fp32", verify=False)
        items = list_inputs([str(args.images)])
        budget, pixels = cpu_budget(bundle, items, args.batch_size)
        embedder = Embedder(bundle, threads=args.threads)
        embedder.embed_arrays(pixels[: args.batch_size], args.batch_size)  # warm-up

        raw_rates, extract_rates = [], []
        for round_index in range(args.rounds):
            started = time.perf_counter()
            embedder.embed_arrays(pixels, args.batch_size)
            raw_rates.append(len(items) / (time.perf_counter() - started))
            out = work / f"features{round_index}"
            started = time.perf_counter()  # the whole call: listing, session start, decode, inference, shard writes
            extract([str(args.images)], bundle, out, batch_size=args.batch_size, workers=args.workers,
                    show_progress=False)
            extract_rates.append(len(items) / (time.perf_counter() - started))
            shutil.rmtree(out)
            print(f"round {round_index + 1}: raw onnxruntime {raw_rates[-1]:.0f} img/s, "
                  f"extract {extract_rates[-1]:.0f} img/s", flush=True)

        best = max(extract_rates)
        result = {
            "images": len(items), "threads": args.threads, "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "providers": embedder.providers, **budget,
            "raw_onnxruntime_img_s": round(max(raw_rates), 1), "extract_img_s": round(best, 1),
            "ratio_to_raw": round(best / max(raw_rates), 3), "ratio_to_limit": round(best / budget["limit_img_s"], 3),
            "load_average": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(result, indent=2))
        print(f"extract / CPU limit = {result['ratio_to_limit']:.3f} (goal on a CPU >= 0.9); "
              f"extract / raw onnxruntime = {result['ratio_to_raw']:.3f} (goal with a GPU >= 0.9)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
