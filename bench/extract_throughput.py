"""Throughput of `corinfomax extract` against raw onnxruntime on pre-decoded arrays, side by side.

Both use the same bundle, onnxruntime threads and batch size, in the same process and run, so the
ratio shows what decoding, resizing, batching and writing shards cost on top of pure inference
(goal: >= 0.9, i.e. decoding hidden behind inference). Rounds alternate to even out machine noise;
the best round of each is compared.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model bundle folder")
    source.add_argument("--checkpoint", type=Path, help="checkpoint to export (fp32) into a temporary bundle")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image folder (default: CIFAR-10 test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads (both sides)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="extract's decode threads (default: its own)")
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
        embedder = Embedder(bundle, threads=args.threads)
        started = time.perf_counter()
        decoded = [decode(item, embedder.resize)[0] for item in items]
        pixels = np.stack([array for array in decoded if array is not None])
        decode_rate = len(items) / (time.perf_counter() - started)
        embedder.embed_arrays(pixels[: args.batch_size], args.batch_size)  # warm-up

        raw_rates, extract_rates = [], []
        for round_index in range(args.rounds):
            started = time.perf_counter()
            embedder.embed_arrays(pixels, args.batch_size)
            raw_rates.append(len(items) / (time.perf_counter() - started))
            out = work / f"features{round_index}"
            started = time.perf_counter()  # the whole call: listing, session start, decode, inference, shard writes
            extract([str(args.images)], bundle, out, batch_size=args.batch_size, threads=args.threads,
                    workers=args.workers, show_progress=False)
            extract_rates.append(len(items) / (time.perf_counter() - started))
            shutil.rmtree(out)
            print(f"round {round_index + 1}: raw onnxruntime {raw_rates[-1]:.0f} img/s, "
                  f"extract {extract_rates[-1]:.0f} img/s", flush=True)

        result = {
            "images": len(items), "threads": args.threads, "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "providers": embedder.providers, "decode_single_thread_img_s": round(decode_rate, 1),
            "raw_onnxruntime_img_s": round(max(raw_rates), 1), "extract_img_s": round(max(extract_rates), 1),
            "ratio": round(max(extract_rates) / max(raw_rates), 3),
        }
        print(json.dumps(result, indent=2))
        print(f"extract / raw onnxruntime = {result['ratio']:.3f} (goal >= 0.9)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
