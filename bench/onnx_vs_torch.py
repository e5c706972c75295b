"""Images/s of PyTorch eager vs ONNX Runtime fp32, fp16 and int8 bundles, side by side in one run.

Every engine runs the same graph (uint8 NHWC pixels in, normalisation inside, L2-normalised embedding out)
on the same real CIFAR-10 images, with the same thread count. Rounds are interleaved (eager, fp32, fp16,
int8, eager, ...) so background load hits every engine alike; the best round counts. Each bundle is
exported with the parity check on: pass a trained --checkpoint, since a random-init network maps all
images to nearly the same direction and its int8 kNN check is then dominated by noise.

    python bench/onnx_vs_torch.py --backbone tiny_resnet
    python bench/onnx_vs_torch.py --checkpoint runs/cpu/checkpoint.pt --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from corinfomax.export.bundle import export_bundle
from corinfomax.export.graph import EmbeddingGraph, load_backbone
from corinfomax.serving.embedder import Embedder
from corinfomax.training.checkpoint import load_checkpoint, save_checkpoint
from corinfomax.training.config import resolve
from corinfomax.training.models import CorInfoMaxModel

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
PRECISIONS = ("fp32", "fp16", "int8")


def random_checkpoint(backbone: str, folder: Path) -> Path:
    """A random-init checkpoint: speed does not depend on the weights."""
    config = resolve("cifar10" if backbone != "tiny_resnet" else "cpu", {"backbone": backbone, "epochs": 1})
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem)
    path = folder / backbone / "checkpoint.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 0})
    return path


def images_per_second(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Best-of-timing for one call, after a warm-up call; repeats until ``seconds`` have passed."""
    run()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random-init --backbone)")
    parser.add_argument("--backbone", default="tiny_resnet", help="backbone of the random-init checkpoint")
    parser.add_argument("--data", type=Path, default=CIFAR10, help="CIFAR-10 root with train/ and test/")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per engine, batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(args.backbone, Path(tmp))
        state = load_checkpoint(checkpoint)
        backbone, _ = load_backbone(state, checkpoint)
        graph = EmbeddingGraph(backbone, state["config"]["mean"], state["config"]["std"]).eval()
        embedders = {}
        for precision in PRECISIONS:
            bundle = export_bundle(checkpoint, Path(tmp) / precision, precision, verify_data=args.data / "test",
                                   calibration_data=args.data / "train", verify_images=500)
            embedders[precision] = Embedder(bundle, providers=["CPUExecutionProvider"], threads=args.threads)
        keys = ("min_cosine", "mean_cosine", "max_abs_diff", "knn_top1_drop")
        parity = {p: {k: e.card.parity.get(k) for k in keys} for p, e in embedders.items()}
        sample = np.stack([embedders["fp32"].preprocess(f) for f in sorted((args.data / "test").rglob("*.jpg"))[:256]])

        results: dict[int, dict[str, float]] = {}
        for batch in args.batches:
            pixels = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])))
            tensor = torch.from_numpy(pixels)
            engines: dict[str, Callable[[], object]] = {"torch": functools.partial(graph, tensor)}
            for precision, embedder in embedders.items():
                engines[f"ort_{precision}"] = functools.partial(embedder.session.run, ["embedding"], {"pixels": pixels})
            best: dict[str, float] = {}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, run in engines.items():
                        best[name] = max(best.get(name, 0.0), images_per_second(run, batch, args.seconds))
            results[batch] = best

    name = args.checkpoint or f"random-init {args.backbone}"
    load = os.getloadavg()[0]
    print(f"\n{name}, {args.threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"best of {args.rounds} interleaved rounds, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'batch':>5} {'torch':>9} {'ort fp32':>9} {'ort fp16':>9} {'ort int8':>9}   "
          f"{'fp32/torch':>10} {'fp16/fp32':>9} {'int8/fp32':>9} {'int8/torch':>10}   (images/s)")
    for batch, r in results.items():
        print(f"{batch:>5} {r['torch']:>9.0f} {r['ort_fp32']:>9.0f} {r['ort_fp16']:>9.0f} {r['ort_int8']:>9.0f}   "
              f"{r['ort_fp32'] / r['torch']:>10.2f} {r['ort_fp16'] / r['ort_fp32']:>9.2f} "
              f"{r['ort_int8'] / r['ort_fp32']:>9.2f} {r['ort_int8'] / r['torch']:>10.2f}")
    print("parity:", json.dumps(parity))
    if args.json:
        args.json.write_text(json.dumps({"model": str(name), "threads": args.threads, "load_average": load,
                                         "images_per_s": results, "parity": parity}, indent=2))


if __name__ == "__main__":
    main()
